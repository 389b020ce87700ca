"""A small matrix-form MILP and two backends: HiGHS (through highspy) and CBC (through PuLP).

The planner builds its models as sparse matrices (fast for 10^4-10^5 variables) and hands
them to a solver. HiGHS is driven through ``highspy`` directly because PuLP 3.3's HiGHS
interface cannot pass a warm start, while ``Highs.setSolution`` can; HiGHS also reports
its proven dual bound. CBC goes through PuLP (``warmStart=True``). A time-limited run is
never trusted as optimal: callers get the incumbent, the solver's dual bound when the
solver exposes one (HiGHS), and compute their own bounds besides.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MILP", "MILPResult", "available_solvers", "resolve_solver"]


@dataclass
class MILPResult:
    x: np.ndarray | None          # best solution found (None: none)
    objective: float              # its objective value (inf: none)
    dual_bound: float             # the solver's proven lower bound (-inf: unknown)
    status: str                   # solver's own status string (not trusted for optimality)
    seconds: float


@dataclass
class MILP:
    """minimise c.x subject to row_lb <= A x <= row_ub, lb <= x <= ub, x[integer] integral."""

    num_vars: int
    c: np.ndarray = None
    lb: np.ndarray = None
    ub: np.ndarray = None
    integer: np.ndarray = None
    _rows: list = field(default_factory=list)    # (cols, coefs, lo, hi)

    def __post_init__(self):
        n = self.num_vars
        self.c = np.zeros(n) if self.c is None else np.asarray(self.c, float)
        self.lb = np.zeros(n) if self.lb is None else np.asarray(self.lb, float)
        self.ub = np.ones(n) if self.ub is None else np.asarray(self.ub, float)
        self.integer = np.ones(n, bool) if self.integer is None else np.asarray(self.integer, bool)

    def add_row(self, cols, coefs, lo=-math.inf, hi=math.inf):
        self._rows.append((np.asarray(cols, np.int64), np.asarray(coefs, float), float(lo), float(hi)))

    def add_rows(self, cols_2d, coefs_2d, lo, hi):
        """Many rows of equal length at once: cols_2d/coefs_2d [m, k], lo/hi scalars or [m]."""
        cols_2d = np.asarray(cols_2d, np.int64)
        coefs_2d = np.broadcast_to(np.asarray(coefs_2d, float), cols_2d.shape)
        m = cols_2d.shape[0]
        lo = np.broadcast_to(np.asarray(lo, float), (m,))
        hi = np.broadcast_to(np.asarray(hi, float), (m,))
        for i in range(m):
            self._rows.append((cols_2d[i], coefs_2d[i], float(lo[i]), float(hi[i])))

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def csr(self):
        starts = [0]
        idx, val = [], []
        for cols, coefs, _, _ in self._rows:
            idx.append(cols)
            val.append(coefs)
            starts.append(starts[-1] + len(cols))
        idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        val = np.concatenate(val) if val else np.zeros(0)
        lo = np.array([r[2] for r in self._rows])
        hi = np.array([r[3] for r in self._rows])
        return np.asarray(starts, np.int64), idx, val, lo, hi

    def objective_of(self, x) -> float:
        return float(self.c @ np.asarray(x, float))

    def is_feasible(self, x, tol=1e-6) -> bool:
        x = np.asarray(x, float)
        if np.any(x < self.lb - tol) or np.any(x > self.ub + tol):
            return False
        if np.any(np.abs(x[self.integer] - np.round(x[self.integer])) > tol):
            return False
        for cols, coefs, lo, hi in self._rows:
            v = float(coefs @ x[cols])
            if v < lo - tol * max(1, abs(lo)) or v > hi + tol * max(1, abs(hi)):
                return False
        return True

    # --- solving ----------------------------------------------------------------------
    def solve(self, solver: str = "highs", time_limit: float = 10.0, rel_gap: float = 1e-4,
              warm_start=None, threads: int = 1) -> MILPResult:
        solver = resolve_solver(solver)
        if solver == "highs":
            return self._solve_highs(time_limit, rel_gap, warm_start, threads)
        return self._solve_cbc(time_limit, rel_gap, warm_start, threads)

    def _solve_highs(self, time_limit, rel_gap, warm_start, threads) -> MILPResult:
        import highspy
        t0 = time.perf_counter()
        h = _highs()
        h.setOptionValue("time_limit", float(max(time_limit, 0.05)))
        h.setOptionValue("mip_rel_gap", float(rel_gap))
        h.setOptionValue("threads", int(threads))
        starts, idx, val, lo, hi = self.csr()
        lp = highspy.HighsLp()
        lp.num_col_ = self.num_vars
        lp.num_row_ = self.num_rows
        lp.col_cost_ = self.c
        lp.col_lower_ = self.lb
        lp.col_upper_ = self.ub
        lp.row_lower_ = np.where(np.isinf(lo), -highspy.kHighsInf, lo)
        lp.row_upper_ = np.where(np.isinf(hi), highspy.kHighsInf, hi)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_ = self.num_vars
        lp.a_matrix_.num_row_ = self.num_rows
        lp.a_matrix_.start_ = starts
        lp.a_matrix_.index_ = idx
        lp.a_matrix_.value_ = val
        lp.integrality_ = [highspy.HighsVarType.kInteger if b else highspy.HighsVarType.kContinuous
                           for b in self.integer]
        h.passModel(lp)
        if warm_start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(np.asarray(warm_start, float))
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        info = h.getInfo()
        status = h.modelStatusToString(h.getModelStatus())
        x = None
        obj = math.inf
        if info.primal_solution_status == 2 or status in ("Optimal", "Time limit reached", "Interrupted by user"):
            xs = np.asarray(h.getSolution().col_value, float)
            if xs.size == self.num_vars and np.all(np.isfinite(xs)):
                x, obj = xs, self.objective_of(xs)
        bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else -math.inf
        if x is not None and not self.is_feasible(x, tol=1e-5):
            x, obj = None, math.inf
        return MILPResult(x, obj, bound, status, time.perf_counter() - t0)

    def _solve_cbc(self, time_limit, rel_gap, warm_start, threads) -> MILPResult:
        import pulp
        t0 = time.perf_counter()
        prob = pulp.LpProblem("moekit_plan", pulp.LpMinimize)
        xs = []
        for j in range(self.num_vars):
            cat = pulp.LpInteger if self.integer[j] else pulp.LpContinuous
            lbj = None if np.isinf(self.lb[j]) else float(self.lb[j])
            ubj = None if np.isinf(self.ub[j]) else float(self.ub[j])
            if self.integer[j] and lbj == 0 and ubj == 1:
                cat = pulp.LpBinary
            if hasattr(prob, "add_variable"):        # PuLP >= 3.3 / 4.x spelling
                xs.append(prob.add_variable(f"x{j}", lbj, ubj, cat=cat))
            else:
                xs.append(pulp.LpVariable(f"x{j}", lbj, ubj, cat))
        prob += pulp.LpAffineExpression([(xs[j], float(v)) for j, v in enumerate(self.c) if v != 0])
        for i, (cols, coefs, lo, hi) in enumerate(self._rows):
            expr = pulp.LpAffineExpression([(xs[j], float(v)) for j, v in zip(cols, coefs)])
            if lo == hi:
                prob += (expr == lo), f"r{i}"
            else:
                if np.isfinite(lo):
                    prob += (expr >= lo), f"r{i}l"
                if np.isfinite(hi):
                    prob += (expr <= hi), f"r{i}u"
        if warm_start is not None:
            for v, x0 in zip(xs, np.asarray(warm_start, float)):
                v.setInitialValue(round(x0) if v.cat != pulp.LpContinuous else x0)
        solver = _cbc_solver(pulp, time_limit, rel_gap, warm_start is not None, threads)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                prob.solve(solver)
        except pulp.PulpSolverError as exc:
            return MILPResult(None, math.inf, -math.inf, f"error: {exc}", time.perf_counter() - t0)
        status = pulp.LpStatus.get(prob.status, str(prob.status))
        x = np.array([v.varValue if v.varValue is not None else np.nan for v in xs], float)
        if np.all(np.isfinite(x)) and self.is_feasible(x, tol=1e-5):
            return MILPResult(x, self.objective_of(x), -math.inf, status, time.perf_counter() - t0)
        return MILPResult(None, math.inf, -math.inf, status, time.perf_counter() - t0)


_HIGHS: dict = {}


def _highs():
    """One silent Highs instance per process (its constructor prints a banner on fd 1)."""
    import highspy
    pid = os.getpid()
    h = _HIGHS.get(pid)
    if h is None:
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        _HIGHS[pid] = h
    else:
        h.clearModel()
        h.clearSolver()
    h.setOptionValue("output_flag", False)
    return h


def _cbc_solver(pulp, time_limit, rel_gap, warm, threads):
    # PuLP 3.x: PULP_CBC_CMD; PuLP 4.x renames the bundled CBC class: try both spellings.
    kw = dict(msg=False, timeLimit=max(1, int(math.ceil(time_limit))), gapRel=rel_gap, warmStart=warm,
              threads=threads)
    for name in ("PULP_CBC_CMD", "COIN_CMD", "CBC_CMD"):
        cls = getattr(pulp, name, None)
        if cls is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                s = cls(**kw)
        except TypeError:
            continue
        if s.available():
            return s
    raise RuntimeError("CBC is not available through PuLP (install pulp with its bundled CBC)")


@functools.lru_cache(maxsize=None)
def _available() -> tuple:
    out = []
    try:
        import highspy  # noqa: F401
        out.append("highs")
    except ImportError:
        pass
    try:
        import pulp
        try:
            _cbc_solver(pulp, 1, 1e-4, False, 1)
            out.append("cbc")
        except RuntimeError:
            pass
    except ImportError:
        pass
    return tuple(out)


def available_solvers() -> list[str]:
    """MILP solvers usable here, preferred first: 'highs' (highspy), 'cbc' (PuLP's bundled CBC)."""
    return list(_available())


def resolve_solver(solver: str) -> str:
    """'auto' -> 'highs' when highspy imports, else 'cbc'. Raises ValueError for unknown/unavailable."""
    s = (solver or "auto").lower()
    if s not in ("auto", "highs", "cbc"):
        raise ValueError(f"unknown solver {solver!r} (choose highs, cbc or auto)")
    avail = available_solvers()
    if s == "auto":
        if not avail:
            raise ValueError("no MILP solver available: install highspy or pulp (with CBC)")
        return avail[0]
    if s not in avail:
        raise ValueError(f"solver {s!r} is not available here (available: {avail or 'none'})")
    return s

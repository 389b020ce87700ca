"""`moekit run`: --json output equals transformers' greedy generate, the store is made next to the
model on first use, errors are one line and exit 2, every flag has help."""
from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers", minversion="5.0")

from _offload_models import PROMPT, hf_generate, load_reference, save_model  # noqa: E402
from moekit.cli import build_parser, main  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = save_model("olmoe", tmp_path_factory.mktemp("cli") / "olmoe", seed=21)
    return d, hf_generate(load_reference(d), PROMPT, 8)


def _run(capsys, *argv):
    rc = main(["run", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_matches_hf_and_store_made_next_to_model(model, capsys):
    d, want = model
    ids = ",".join(map(str, PROMPT))
    rc, out, _ = _run(capsys, "--model", d, "--budget", "auto", "--prompt-ids", ids, "--max-new-tokens", 8, "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["generated_ids"] == want
    assert (d.parent / "olmoe.moekit-experts" / "index.json").exists()
    assert res["store"] == str(d.parent / "olmoe.moekit-experts")
    for k in ("tokens_per_s", "hit_rate", "hit_rate_decode", "bytes_read_per_token", "peak_expert_bytes",
              "budget_bytes", "min_budget_bytes"):
        assert k in res
    assert res["peak_expert_bytes"] <= res["budget_bytes"]
    # at the minimum, with another policy, LRU and the page cache dropped: same tokens, within budget
    rc, out, _ = _run(capsys, "--model", d, "--budget", res["min_budget_bytes"], "--policy", "lru",
                      "--page-cache", "drop", "--prompt-ids", ids, "--max-new-tokens", 8, "--json")
    low = json.loads(out)
    assert rc == 0 and low["generated_ids"] == want and low["peak_expert_bytes"] <= low["budget_bytes"]
    assert low["bytes_read"] > res["bytes_read"]
    rc, out, _ = _run(capsys, "--model", d, "--budget", "1GiB", "--prompt-ids", ids, "--max-new-tokens", 8)
    assert rc == 0 and "generated ids: " + ",".join(map(str, want)) in out and "hit rate" in out
    rc, out, _ = _run(capsys, "--model", d, "--budget", res["min_budget_bytes"], "--prefetch-predictor", "wholepath",
                      "--prompt-ids", ids, "--max-new-tokens", 8, "--no-predict", "--json")
    wp = json.loads(out)
    assert rc == 0 and wp["generated_ids"] == want and wp["prefetch_predictor"] == "wholepath"
    assert wp["wholepath_guesses"] > 0 and wp["peak_expert_bytes"] <= wp["budget_bytes"]
    assert res["prefetch"] is False  # on CPU prefetch is opt-in (a predictor flag opts in)
    rc, out, err = _run(capsys, "--model", d, "--budget", "1GiB", "--prompt-ids", ids, "--no-prefetch",
                        "--prefetch-predictor", "wholepath")
    assert rc == 2 and out == "" and "--prefetch-predictor needs prefetching" in err


def test_budget_below_minimum(model, capsys):
    d, _ = model
    rc, out, err = _run(capsys, "--model", d, "--budget", "1KiB", "--prompt-ids", "1,2,3")
    assert rc == 2 and out == ""
    assert "--budget 1KiB" in err and "the minimum is" in err


@pytest.mark.parametrize("argv, msg", [
    (["--budget", "lots", "--prompt-ids", "1,2"], "--budget"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hello"], "tokenizer"),
])
def test_bad_input(model, capsys, argv, msg):
    d, _ = model
    rc, _, err = _run(capsys, "--model", d, *argv)
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_not_a_model_dir(tmp_path, capsys):
    rc, _, err = _run(capsys, "--model", tmp_path, "--prompt-ids", "1")
    assert rc == 2 and "config.json" in err


def test_every_flag_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    p = sub.choices["run"]
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= {"--model", "--budget", "--device", "--policy", "--prompt",
                                                   "--prompt-ids", "--max-new-tokens", "--store", "--json"}
    assert all(a.help and len(a.help) > 15 for a in flags)


def test_prompt_ids_file_batched_and_scheduled(model, tmp_path, capsys):
    """--prompt-ids-file: every prompt's tokens equal transformers' generate on it alone, scheduled
    batches or FIFO."""
    d, want = model
    ref = load_reference(d)
    prompts = [PROMPT, [7, 7, 7, 7], PROMPT[3:] + [5], [7, 7, 8, 7, 7], [90, 3, 44]]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n\n")
    expect = [hf_generate(ref, p, 6) for p in prompts]
    assert expect[0] == want[:6]
    for sched in ("similar", "fifo"):
        rc, out, _ = _run(capsys, "--model", d, "--budget", "1GiB", "--prompt-ids-file", f, "--batch-size", 2,
                          "--schedule", sched, "--max-new-tokens", 6, "--json")
        assert rc == 0
        res = json.loads(out)
        assert [q["generated_ids"] for q in res["requests"]] == expect
        assert [q["prompt_ids"] for q in res["requests"]] == prompts
        assert sorted(i for b in res["batches"] for i in b) == list(range(5)) and res["schedule"] == sched
        assert res["peak_expert_bytes"] <= res["budget_bytes"]
    assert res["batches"] == [[0, 1], [2, 3], [4]]
    rc, out, _ = _run(capsys, "--model", d, "--budget", "1GiB", "--prompt-ids-file", f, "--max-new-tokens", 6)
    assert rc == 0 and out.startswith("[0] " + ",".join(map(str, expect[0]))) and "distinct experts" in out
    bad = tmp_path / "bad.txt"
    bad.write_text("1,2\n3,x\n")
    rc, _, err = _run(capsys, "--model", d, "--prompt-ids-file", bad)
    assert rc == 2 and "prompt 2" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "--model", d, "--prompts-file", f)
    assert rc == 2 and "--prompts-file needs a tokenizer" in err
    rc, _, err = _run(capsys, "--model", d, "--prompt-ids-file", f, "--batch-size", 0)
    assert rc == 2 and "--batch-size" in err

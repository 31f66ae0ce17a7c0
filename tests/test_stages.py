import os

import pytest

from vild_d2.pipeline.stages import StageRunner


def test_stage_skips_when_key_and_outputs_match(tmp_path):
    calls = []
    out = tmp_path / "o.txt"

    def work():
        calls.append(1)
        out.write_text("x")
        return {"n": len(calls)}

    assert StageRunner(str(tmp_path)).run("s", {"a": 1}, work, outputs=[str(out)]) == {"n": 1}
    assert StageRunner(str(tmp_path)).run("s", {"a": 1}, work, outputs=[str(out)]) == {"n": 1}
    assert len(calls) == 1
    out.unlink()  # a missing output reruns the stage
    StageRunner(str(tmp_path)).run("s", {"a": 1}, work, outputs=[str(out)])
    assert len(calls) == 2


def test_an_interrupted_run_resumes_and_changed_inputs_keep_the_old_outputs_aside(tmp_path):
    out = tmp_path / "train"

    def interrupted():
        out.mkdir(exist_ok=True)
        (out / "partial").write_text("lr 1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageRunner(str(tmp_path)).run("train", {"lr": 1}, interrupted, replaces=[str(out)])
    # same key again: the partial work stays and is resumed
    seen = []
    StageRunner(str(tmp_path)).run("train", {"lr": 1}, lambda: seen.append(sorted(os.listdir(out))) or {},
                                   replaces=[str(out)])
    assert seen == [["partial"]]

    # other key, and the new run fails: the old outputs are back as they were, and so is their key
    def fails():
        assert not out.exists() and (tmp_path / "train.previous" / "partial").exists()
        out.mkdir()
        (out / "half").write_text("lr 2")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        StageRunner(str(tmp_path)).run("train", {"lr": 2}, fails, replaces=[str(out)])
    assert sorted(os.listdir(out)) == ["partial"] and not (tmp_path / "train.previous").exists()
    # other key, and the new run succeeds: the old outputs are gone once it is done
    StageRunner(str(tmp_path)).run("train", {"lr": 2}, lambda: out.mkdir() or {}, replaces=[str(out)])
    assert os.listdir(out) == [] and not (tmp_path / "train.previous").exists()


def test_a_damaged_output_reruns_its_stage_and_names_the_file(tmp_path):
    out = tmp_path / "model.pth"
    calls, said = [], []

    def work():
        calls.append(1)
        out.write_bytes(b"weights" * 10)

    StageRunner(str(tmp_path)).run("s", {}, work, outputs=[str(out)])
    StageRunner(str(tmp_path)).run("s", {}, work, outputs=[str(out)])
    assert len(calls) == 1
    out.write_bytes(b"weights")  # truncated
    StageRunner(str(tmp_path), log=said.append).run("s", {}, work, outputs=[str(out)])
    assert len(calls) == 2 and any(f"{out} has 7 bytes where 70 were written" in m for m in said)
    data = bytearray(out.read_bytes())
    data[0] ^= 1  # same size, other bytes
    out.write_bytes(bytes(data))
    said.clear()
    StageRunner(str(tmp_path), log=said.append).run("s", {}, work, outputs=[str(out)])
    assert len(calls) == 3 and any("differs from what was written" in m for m in said)


def test_upstream_change_invalidates_downstream(tmp_path):
    calls = []
    for key in (1, 1, 2):
        r = StageRunner(str(tmp_path))
        r.run("up", {"k": key}, lambda: {})
        r.run("down", {}, lambda: calls.append(1), after=["up"])
    assert len(calls) == 2


def test_parallel_stages_run_at_the_same_time_and_keep_their_order(tmp_path):
    import threading

    barrier = threading.Barrier(2, timeout=10)  # passes only when both stages run at once

    def stage(name):
        def work():
            barrier.wait()
            return {"name": name}
        return dict(name=name, key={}, fn=work)

    runner = StageRunner(str(tmp_path), log=lambda m: None)
    results = runner.run_parallel([stage("a"), stage("b")], workers=2)
    assert results == [{"name": "a"}, {"name": "b"}]
    assert set(runner.digests) == {"a", "b"}
    # a rerun skips both, without waiting on each other
    assert StageRunner(str(tmp_path), log=lambda m: None).run_parallel(
        [dict(name="a", key={}, fn=lambda: 1 / 0), dict(name="b", key={}, fn=lambda: 1 / 0)], 2
    ) == [{"name": "a"}, {"name": "b"}]


def test_a_failed_parallel_stage_is_raised_after_the_others_finish(tmp_path):
    import pytest

    done = []

    def fail():
        raise RuntimeError("stage b failed")

    runner = StageRunner(str(tmp_path), log=lambda m: None)
    with pytest.raises(RuntimeError, match="stage b failed"):
        runner.run_parallel([dict(name="a", key={}, fn=lambda: done.append(1) or {"ok": 1}),
                             dict(name="b", key={}, fn=fail)], workers=2)
    assert done == [1] and "a" in runner.digests and "b" not in runner.digests

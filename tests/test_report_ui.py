"""The Runs panel while and after the trainer writes the style report (app/jobs.py, app/report_view.py). No torch."""

from __future__ import annotations

import subprocess
import sys
import time

from app import jobs, report_view
from trainer.events import EventLog


def test_run_is_reporting_until_the_report_event(tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    waiting = tmp_path / "next-run"
    waiting.mkdir()
    jobs.write_job(waiting, {"queued_at": time.time()})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for the trainer
    jobs._CHILDREN[child.pid] = child
    try:
        jobs.write_job(run, {"queued_at": time.time() - 9, "pid": child.pid, "launched_at": time.time() - 5})
        log = EventLog(run / "events.jsonl")
        log.emit("done", step=4)
        st = jobs.status(run)
        assert st.state == "reporting"
        assert "running" in report_view.report_markdown(st.state, st.events)
        assert jobs.advance(tmp_path) is None  # the next run waits: the trainer still uses the device
        assert report_view.report_image(run, st.events) is None
        log.emit("report", style_lift={"0.5": 0.05, "1.0": 0.125}, fidelity={"0.0": 1.0, "0.5": 0.9, "1.0": 0.75},
                 copying={"0.0": 0.5, "0.5": 0.6, "1.0": 0.7}, held_out=True, features="download-free",
                 verdict="partly learned", progress={"0.5": 0.1, "1.0": 0.34},
                 reason="at strength 1.0 the LoRA moved 34% of the way")
        (run / "report.png").write_bytes(b"png")
        st = jobs.status(run)
        assert st.state == "done"
        text = report_view.report_markdown(st.state, st.events)
        assert "LoRA 1.0 +0.125" in text and "LoRA 1.0 0.75" in text and "held-out prompts;" in text
        assert "verdict: partly learned**: at strength 1.0 the LoRA moved 34%" in text and "LoRA 1.0 34%" in text
        log.emit("report", verdict="not learned", progress={"1.0": 7.8}, has_style=False,
                 reason="the training images hardly differ from what the base draws for their captions")
        text = report_view.report_markdown("done", jobs.status(run).events)
        assert "verdict: not learned**: the training images hardly differ" in text and "780%" not in text
        assert "warning" not in text  # none given, none shown
        log.emit("report", verdict="learned", progress={"1.0": 0.9}, reason="moved 90%",
                 warning="overcooked: prompt fidelity at strength 1.0 fell to 0.12 (base 0.69, under 50% of it)")
        text = report_view.report_markdown("done", jobs.status(run).events)
        assert "verdict: learned**: moved 90%\n- **warning**: overcooked: prompt fidelity" in text
        assert report_view.report_image(run, st.events) == str(run / "report.png")
    finally:
        child.kill()
        child.wait()


def test_failed_report_is_shown_with_its_reason_and_the_run_is_done(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    jobs.write_job(run, {"queued_at": 1.0, "pid": 999999999, "launched_at": 2.0, "returncode": 0})
    log = EventLog(run / "events.jsonl")
    log.emit("done", step=4)
    log.emit("report_failed", reason="report.clip_model '/x': not a local CLIP model folder (no config.json)")
    st = jobs.status(run)
    assert st.state == "done"
    text = report_view.report_markdown(st.state, st.events)
    assert "failed" in text and "no config.json" in text and "adapters are fine" in text

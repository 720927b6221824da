#!/usr/bin/env python3
"""`make llm-judge`: keyroom with ONI retrieval rewards whose labels come from a tiny
language model made on this machine (judges/llm/tiny_judge.py) and served by
`transformers serve`, a real OpenAI-compatible server. Then the judge's figures: its
latency as the reward service measured it (p50, p99), calls per labelled text, and
how many requests the server answered; then --probe requests sent straight to the
server, one at a time, time it without the rest of the run competing for the CPU.

The model is trained into --model (once; --retrain makes it again). Every run starts
with an empty label store in the run directory, so each text goes to the server.

Usage: scripts/llm_judge.py [--spur target/release/spur] [--config configs/keyroom-oni.toml]
           [--model runs/tiny-judge] [--run-dir runs/llm-judge] [--retrain]
           [other `spur local` arguments, e.g. --set stop.env_steps=300000]
"""
import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "judges/llm/tiny_judge.py"
sys.path.insert(0, str(TINY.parent))
import tiny_judge  # noqa: E402


def start_server(model: Path, run_dir: Path) -> tuple[subprocess.Popen, dict]:
    url_file = run_dir / "judge.json"
    log = open(run_dir / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(TINY), "serve", "--model", str(model), "--url-file", str(url_file)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    while not url_file.exists():
        if server.poll() is not None:
            sys.exit(f"the judge server exited before serving; see {run_dir / 'server.log'}")
        time.sleep(0.2)
    return server, json.loads(url_file.read_text())


def probe(found: dict, n: int) -> list[float]:
    """Milliseconds of `n` requests sent straight to the server, one at a time, each a
    random batch of keyroom texts in the service's prompt and request shape."""
    template = (ROOT / "prompts/classify.txt").read_text()
    goal = (ROOT / "prompts/keyroom-goal.txt").read_text()
    rng = random.Random(1)
    took = []
    for texts in tiny_judge.batches(rng, n):
        body = json.dumps({
            "model": found["model"],
            "messages": [{"role": "user", "content": tiny_judge.render(template, goal, texts)}],
            "temperature": 0.0,
            "max_tokens": 2048,
        }).encode()
        req = urllib.request.Request(f"{found['base_url']}/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        started = time.monotonic()
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        took.append((time.monotonic() - started) * 1000)
        if answer.strip() != tiny_judge.answer(texts):
            sys.exit(f"the server answered {answer!r} for {texts}")
    return sorted(took)


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spur", default="target/release/spur")
    p.add_argument("--config", default="configs/keyroom-oni.toml")
    p.add_argument("--model", default="runs/tiny-judge")
    p.add_argument("--run-dir", default="runs/llm-judge")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--probe", type=int, default=50,
                   help="requests sent straight to the server after the run, to time it")
    args, extra = p.parse_known_args()

    model = Path(args.model).resolve()
    if args.retrain or not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(TINY), "train", "--out", str(model)], check=True)
    run_dir = Path(args.run_dir).resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)

    server, found = start_server(model, run_dir)
    try:
        started = time.monotonic()
        cmd = [args.spur, "local", "--config", args.config, "--run-dir", str(run_dir),
               "--set", "reward_service.judge=openai",
               "--set", f"reward_service.openai_base_url={found['base_url']}",
               "--set", f"reward_service.openai_model={found['model']}",
               "--set", f"reward_service.store={run_dir / 'labels.redb'}", *extra]
        print("+", " ".join(cmd), flush=True)
        code = subprocess.call(cmd)
        seconds = time.monotonic() - started
        probed = probe(found, args.probe) if code == 0 and args.probe else []
    finally:
        stop(server)
    if code != 0:
        sys.exit(f"spur local exited with {code}")

    judge = json.loads((run_dir / "reward_service.json").read_text())
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    answered = sum(
        '"POST /v1/chat/completions HTTP/1.1" 200' in line
        for line in (run_dir / "server.log").read_text().splitlines()
    )
    print()
    print(f"judge:   {judge['judge']} (transformers serve at {found['base_url']})")
    print(f"labels:  {judge['labels']} texts, {judge['positive_labels']} helpful, "
          f"{judge['unparseable_answers']} unparseable answers")
    print(f"calls:   {judge['llm_calls']} judge calls ({judge['llm_failures']} failed), "
          f"{judge['calls_per_labelled_text']:.2f} calls per labelled text; "
          f"the server answered {answered} requests")
    print(f"latency: p50 {judge['llm_latency_p50_ms']:.0f} ms, "
          f"p99 {judge['llm_latency_p99_ms']:.0f} ms per judge call")
    if probed:
        def at(q):
            return probed[min(len(probed) - 1, int(q * len(probed)))]
        print(f"server:  p50 {at(0.5):.0f} ms, p99 {at(0.99):.0f} ms over {len(probed)} "
              "requests sent one at a time after the run (batches of 1 to 7 texts)")
    print(f"run:     {last['env_steps']} env steps in {seconds:.0f} s, success "
          f"{last['success_rate']:.2f} (last 100 episodes), mean return "
          f"{last['episode_return_mean']:.2f}")


if __name__ == "__main__":
    main()

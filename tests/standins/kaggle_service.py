"""A stand-in for the official `kaggle` command, run as `kaggle` from PATH: kernels, their versions, states, outputs
and logs kept in a folder ($FAKE_KAGGLE_STATE), moved on as a test's script says. It prints what kaggle-cli 2.2
prints for the calls the chain driver makes (push, status, output, logs, competitions submit, config view).

The script ($FAKE_KAGGLE_STATE/script.json): {"kernels": {SLUG: [VERSION, ...]}, "submit": "ok" | "403"}, a VERSION
{"states": [...], "failure": "...", "outputs": {PATH: JSON or text}, "log": [LINE, ...]} for each push in turn
(the last one repeats). Each `kernels status` call moves the version one state on (QUEUED → RUNNING → its end).
Every push is logged in order (pushes.jsonl) with its metadata and the kernels of its accelerator kind (TPU, GPU)
that were active then.
"""

import json
import os
import re
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_KAGGLE_STATE"])
DEFAULT = {"states": ["QUEUED", "RUNNING", "COMPLETE"]}


def load(name, default):
    path = STATE / name
    return json.loads(path.read_text()) if path.is_file() else default


def save(name, value):
    (STATE / name).write_text(json.dumps(value, indent=1))


def spec(slug, number):
    versions = load("script.json", {}).get("kernels", {}).get(slug) or [DEFAULT]
    return {**DEFAULT, **versions[min(number, len(versions)) - 1]}


def active(versions, slug):
    entry = versions.get(slug)
    if not entry:
        return False
    states = spec(slug, entry["number"])["states"]
    return states[min(entry["step"], len(states) - 1)] in ("QUEUED", "RUNNING")


def main(argv):
    with (STATE / "calls.jsonl").open("a") as log:
        log.write(json.dumps(argv) + "\n")
    versions = load("versions.json", {})  # slug -> {"number", "step", "owner", "kind"}
    if argv[:2] == ["config", "view"]:
        print("- username: " + os.environ.get("FAKE_KAGGLE_CONFIG_USERNAME", "None"))
        return 0
    if argv[:2] == ["kernels", "push"]:
        folder = Path(argv[argv.index("-p") + 1])
        metadata = json.loads((folder / "kernel-metadata.json").read_text())
        owner, slug = metadata["id"].split("/")
        number = versions.get(slug, {}).get("number", 0) + 1
        kind = "tpu" if metadata.get("enable_tpu") else "gpu" if metadata.get("enable_gpu") else None
        same_kind = sorted(
            other for other, entry in versions.items() if kind and entry["kind"] == kind and active(versions, other)
        )
        with (STATE / "pushes.jsonl").open("a") as log:
            log.write(
                json.dumps({"slug": slug, "version": number, "metadata": metadata, "active_of_its_kind": same_kind})
                + "\n"
            )
        versions[slug] = {"number": number, "step": 0, "owner": owner, "kind": kind}
        save("versions.json", versions)
        print(
            "Kernel version %d successfully pushed.  Please check progress at https://www.kaggle.com/code/%s/%s"
            % (number, owner, slug)
        )
        return 0
    if argv[0] == "kernels" and argv[1] in ("status", "output", "logs"):
        owner, slug = argv[2].split("/")[:2]
        entry = versions.get(slug)
        if entry is None:
            print(f"404 Client Error: Not Found for url: https://www.kaggle.com/api/v1/kernels/{owner}/{slug}")
            return 1
        version = spec(slug, entry["number"])
        state = version["states"][min(entry["step"], len(version["states"]) - 1)]
        if argv[1] == "status":
            entry["step"] += 1
            save("versions.json", versions)
            print(f'{owner}/{slug} has status "KernelWorkerStatus.{state}"')
            if version.get("failure") and state == "ERROR":
                print(f'Failure message: "{version["failure"]}"')
        elif argv[1] == "output":
            target = Path(argv[argv.index("-p") + 1])
            pattern = re.compile(argv[argv.index("--file-pattern") + 1]) if "--file-pattern" in argv else None
            for path, content in version.get("outputs", {}).items():
                if pattern is None or pattern.search(path):
                    (target / path).parent.mkdir(parents=True, exist_ok=True)
                    (target / path).write_text(content if isinstance(content, str) else json.dumps(content))
        else:
            entries = [
                {"stream_name": "stderr", "time": 60.0 * (index + 1), "data": line + "\n"}
                for index, line in enumerate(version.get("log", []))
            ]
            print(json.dumps(entries))
        return 0
    if argv[:2] == ["competitions", "submit"]:
        with (STATE / "submissions.jsonl").open("a") as log:
            log.write(json.dumps(argv) + "\n")
        if load("script.json", {}).get("submit") == "403":
            print(
                "403 Client Error: Forbidden for url: https://www.kaggle.com/api/v1/competitions.CompetitionApiService/"
                "CreateCodeSubmission"
            )
            return 1
        print("Successfully submitted to HPA Single Cell Classification")
        return 0
    print("stand-in kaggle: unknown call " + " ".join(argv), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

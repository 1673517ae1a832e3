"""The ``crowdtrain worker`` command: a headless worker that computes units for a coordinator.

    crowdtrain worker --coordinator http://host:8080 [--threads N] [--max-units N]
                      [--worker-id ID [--key-file FILE]] [--name NAME] [--cache DIR] [--no-progress]
                      [--grace SECONDS] [--max-retry-time SECONDS | --forever]

Parses the arguments, installs the SIGTERM/Ctrl-C handlers (``worker_py.stop``) and runs the
loop (``worker_py.loop``: a prefetch thread fetches the next unit while the current one
trains) with the progress display (``worker_py.progress``). On SIGTERM or Ctrl-C the worker
takes no more units, finishes the current one if it completes within the grace period, else
hands it back (as it does the prefetched one), and exits 0; a second signal hands back at once.
A coordinator of a closed deployment (``--worker-tokens``) needs the operator's token in
``$CROWDTRAIN_TOKEN`` (sent as ``Authorization: Bearer <token>``; not a flag, so that it stays
out of process listings).

Exit status: 0 stopped, finished, or ``--max-units`` done; 1 the coordinator speaks another
protocol (upgrade the worker), the URL is not a coordinator (a host name that does not
resolve, a server that answers otherwise), or it stayed unreachable for ``--max-retry-time``;
2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import threading
import urllib.parse
from pathlib import Path

from contract.errors import ContractError
from contract.names import NameRequest
from contract.units import WORKER_KEY_RE, UnitRequest
from worker_py.client import MAX_RETRY_TIME, BlobCache, Client, GaveUp, NotCoordinator, Refused, Stopped
from worker_py.progress import Progress
from worker_py.stop import GRACE, StopFlag, install_signals

TOKEN_ENV = "CROWDTRAIN_TOKEN"   # an operator-issued worker token, for a coordinator with --worker-tokens
KEY_ENV = "CROWDTRAIN_WORKER_KEY"   # the secret a --worker-id is bound to (contract.units.WORKER_KEY_HEADER)


def default_cache() -> Path:
    """``$CROWDTRAIN_CACHE/blobs``, else ``~/.cache/crowdtrain/blobs``."""
    return Path(os.environ.get("CROWDTRAIN_CACHE") or "~/.cache/crowdtrain").expanduser() / "blobs"


def stored_key(path: Path) -> str:
    """The key kept in ``path``; a new random one written there (mode 600) when there is none yet."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")   # written whole, then linked in:
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)              # no reader sees a half-made file
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.link(draft, path)
    except FileExistsError:   # another worker of this id made it meanwhile: use that one
        return path.read_text().strip()
    finally:
        draft.unlink(missing_ok=True)
    return key


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Compute work units for a crowdtrain coordinator. Ctrl-C or "
                                "SIGTERM: take no more units, let the current one finish within --grace seconds or "
                                "hand it back, exit 0; a second Ctrl-C: hand it back now.",
                                epilog=f"A closed deployment's coordinator (--worker-tokens) needs the operator's "
                                f"worker token in ${TOKEN_ENV}. A worker's id is bound to a secret key (random for a "
                                f"random id; for a --worker-id, the one in ${KEY_ENV}, else the one kept in "
                                f"--key-file, made there on its first run), so that knowing an id is not enough to act "
                                f"as that worker.")
    p.add_argument("--coordinator", required=True, metavar="URL",
                   help="coordinator base URL, http(s)://host:port (required)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where units train: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or "
                        "cuda:N (default: auto)")
    p.add_argument("--max-units", type=_positive_int, metavar="N",
                   help="exit after N accepted units (default: none, until the job is finished)")
    p.add_argument("--worker-id", metavar="ID", help=f"worker id (default: random, stable for this process, bound to "
                   f"a random key; a given id is bound to the key in ${KEY_ENV} if set, else to the one in "
                   f"--key-file)")
    p.add_argument("--key-file", type=Path, metavar="FILE",
                   help=f"where a --worker-id's secret key is kept, made (mode 600) on the id's first run so that "
                        f"a restarted worker keeps its id (default: CACHE/keys/ID.key; ${KEY_ENV} wins over it)")
    p.add_argument("--name", metavar="NAME",
                   help="display name on the coordinator's leaderboard for this worker id (default: none, an "
                        "anonymous tag); 1 to 32 printable characters")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="blob cache folder (default: $CROWDTRAIN_CACHE/blobs or ~/.cache/crowdtrain/blobs)")
    p.add_argument("--prefetch", action="store_true",
                   help="ask for the next unit while the current one trains: no idle fetch, but each unit "
                        "starts from a model without this worker's previous result, which costs accuracy at "
                        "equal samples (default: off; worth it on a slow link to a large model)")
    p.add_argument("--no-error-feedback", action="store_true",
                   help="send each unit's delta as the unit's codec encodes it, without the residual that "
                        "a lossy codec (fp16, int8, topk) dropped from earlier units (default: off, i.e. error "
                        "feedback on: the residual is kept in memory and added to the next unit's delta, for "
                        "the units the coordinator allows it: never with replicated checks)")
    p.add_argument("--no-progress", action="store_true",
                   help="no status line, message lines only (default: off, a status line)")
    p.add_argument("--grace", type=_seconds, default=GRACE, metavar="SECONDS",
                   help=f"on SIGTERM/Ctrl-C, let the current unit finish for this long (default: {GRACE:g})")
    retry = p.add_mutually_exclusive_group()
    retry.add_argument("--max-retry-time", type=_seconds, default=MAX_RETRY_TIME, metavar="SECONDS",
                       help="give up (exit 1) once the coordinator has been unreachable this long "
                            f"(default: {MAX_RETRY_TIME:g})")
    retry.add_argument("--forever", action="store_true",
                       help="never give up on an unreachable coordinator (default: off)")
    return p


def run(args: argparse.Namespace, prog: str = "crowdtrain worker") -> int:
    """Check the arguments, then work until done or stopped; returns the exit status."""
    worker_id = args.worker_id or f"py-{secrets.token_hex(8)}"
    try:
        UnitRequest(worker_id=worker_id, backend="python")
    except ContractError as e:
        print(f"{prog}: --worker-id: expected {e.expected}, got {worker_id!r}", file=sys.stderr)
        return 2
    if args.key_file is not None and not args.worker_id:
        print(f"{prog}: --key-file: expected with a --worker-id (a random id has a random key, kept nowhere)",
              file=sys.stderr)
        return 2
    cache = args.cache.expanduser() if args.cache else default_cache()
    key, source = os.environ.get(KEY_ENV), f"${KEY_ENV}"
    if not key and args.worker_id:
        key_file = args.key_file.expanduser() if args.key_file else cache / "keys" / f"{worker_id}.key"
        source = f"--key-file {key_file}"
        try:
            key = stored_key(key_file)
        except OSError as e:
            print(f"{prog}: {source}: cannot read or make the worker key: {e.strerror or e}", file=sys.stderr)
            return 2
    elif not key:
        key = secrets.token_urlsafe(24)   # a random id's: it dies with the process, as the id does
    if not WORKER_KEY_RE.fullmatch(key):
        print(f"{prog}: {source}: expected 22 to 128 characters of A-Z a-z 0-9 _ - (base64url), got "
              f"{len(key)} characters", file=sys.stderr)
        return 2
    name = None
    if args.name is not None:
        try:
            name = NameRequest(name=args.name).name
        except ContractError as e:
            print(f"{prog}: --name: expected {e.expected.removeprefix('null or ')}, got {args.name!r}", file=sys.stderr)
            return 2
    progress = Progress(enabled=not args.no_progress)
    try:
        client = Client(args.coordinator, cache=BlobCache(cache), log=progress.say,
                        max_retry_time=None if args.forever else args.max_retry_time,
                        token=os.environ.get(TOKEN_ENV) or None, worker_key=key)
    except ValueError as e:
        print(f"{prog}: --coordinator: {e}", file=sys.stderr)
        return 2
    stop = StopFlag(args.grace)
    if name is not None:
        threading.Thread(target=set_name, args=(client, worker_id, name, stop, progress.say), daemon=True,
                         name="set-name").start()
    previous = install_signals(stop, progress.say) if threading.current_thread() is threading.main_thread() else {}
    try:
        # The only deferred import: the loop pulls in torch, which takes seconds; imported once the
        # signals are ours, and never for `crowdtrain worker --help` or bad arguments.
        from worker_py.loop import work

        code = work(client, worker_id, stop, progress, args.threads, args.max_units, args.prefetch,
                    error_feedback=not args.no_error_feedback, device=args.device)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        progress.close()
    progress.say(f"{'stopped' if code == 0 else 'exiting'}: {progress.summary()}, "
                 f"{client.blob_gets} blob downloads")
    return code


def set_name(client: Client, worker_id: str, name: str, stop, say) -> bool:
    """``POST /api/v1/workers/<id>/name`` (retried while the coordinator is unreachable, beside the
    work loop); says what happened. True when the coordinator took the name."""
    body = json.dumps(NameRequest(name=name).to_json()).encode("utf-8")
    path = f"/api/v1/workers/{urllib.parse.quote(worker_id, safe='')}/name"
    try:
        _, _, data = client.retry(lambda: client._request("POST", path, body, "application/json"), stop.event)
    except Refused as e:
        say(f"--name not set: {e.message or e.code} (HTTP {e.status})")
        return False
    except (GaveUp, Stopped, NotCoordinator):
        return False   # the work loop says why
    try:
        tag = json.loads(data.decode("utf-8")).get("tag", "")
    except (UnicodeDecodeError, ValueError, AttributeError):
        tag = ""
    say(f"leaderboard name set: {name!r}" + (f" ({tag})" if tag else ""))
    return True


def cli(argv: list[str], prog: str = "crowdtrain worker", command: str = "worker") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args, prog)
    except KeyboardInterrupt:   # Ctrl-C before the handlers are installed
        print(f"{prog}: interrupted", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

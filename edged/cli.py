"""The `edged` command line: run, check, status, send, bench, --version.

Exit codes: 0 ok, 2 usage, 69 daemon/broker unreachable, 78 config or model error.
User mistakes print one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from edged import __version__, config
from edged.errors import ConfigError, EdgedError, ModelError, UnavailableError

EX_UNAVAILABLE, EX_CONFIG = 69, 78


def _setup_logging(level: str, env: dict[str, str]) -> None:
    # under systemd, journald stamps each line itself
    fmt = "%(levelname)s %(name)s: %(message)s" if env.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


def _load(args: argparse.Namespace) -> config.Config:
    return config.load(args.config or config.default_path(os.environ))


def cmd_run(args: argparse.Namespace) -> int:
    from edged.daemon import Supervisor

    cfg = _load(args)
    _setup_logging(cfg.logging.level, dict(os.environ))
    log = logging.getLogger(__name__)
    log.info("edged %s starting: config %s, model %s", __version__, cfg.source, cfg.model.path)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    return Supervisor(cfg).run()


def cmd_check(args: argparse.Namespace) -> int:
    from edged import accel, postprocess

    cfg = _load(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for warning in cfg.warnings:
        print(f"edged check: warning: {warning}", file=sys.stderr)
    choice = accel.choose(cfg)
    model = choice.model
    labels = postprocess.load_labels(cfg.model.labels)
    if cfg.model.task == "detect":
        postprocess.detection_outputs(model)
    model.warm_up()
    print(f"config       {cfg.source}: ok")
    print(f"model        {model.path} ({model.backend}, task {cfg.model.task}, {len(labels)} labels)")
    print(f"input        {list(model.input.shape)} {model.input.dtype} quantization "
          f"{(model.input.scale, model.input.zero_point) if model.input.scale else None}")
    if model.input.dtype.startswith("float"):
        from edged import preprocess

        mean, std, source = preprocess.model_normalization(model.path, model.input, cfg.model.mean, cfg.model.std)
        print(f"normalize    (pixel - {mean}) / {std}, from {source}")
    for o in model.outputs:
        print(f"output       {o.name} {list(o.shape)} {o.dtype}")
    rep = choice.report()
    share = "" if rep["total_ops"] is None else \
        f", {rep['delegated_ops']} of {rep['total_ops']} ops delegated{' (partial)' if rep['partial'] else ''}"
    if choice.kind == "gpu":
        share = ", fully on the GPU" if not rep["partial"] else ", partly on the GPU (some ops on the CPU)"
    print(f"accelerator  {choice.kind} (preference {', '.join(cfg.accelerator.prefer)}{share})")
    for kind, reason in choice.skipped:
        print(f"  skipped    {kind}: {reason}")
    print(f"mqtt         {cfg.mqtt.host}:{cfg.mqtt.port} topics {cfg.prefix}/in/+ -> {cfg.prefix}/out/<stream>")
    return _check_selftest(cfg, choice)


def _check_selftest(cfg: Any, choice: Any) -> int:
    """`edged check`'s self-test line: the chosen accelerator against the expected outputs (the record, the expect
    file, else the CPU now); a CPU mismatch is exit 78, as at `edged run`."""
    from types import SimpleNamespace

    from edged import preprocess, runtime, selftest

    def answers(model: Any) -> dict[str, Any]:
        mean, std, _src = preprocess.model_normalization(model.path, model.input, cfg.model.mean, cfg.model.std)
        frames = selftest.payloads(cfg.model.selftest.frames, model.input.shape, model.input.dtype)
        return selftest.run(model, preprocess.Preprocessor(model.input, mean, std), frames)

    model = choice.model
    got = answers(model)
    expected = selftest.Expected.load(cfg, selftest.model_sha256(cfg.model.path))
    if expected is None or (not cfg.model.selftest.expect and expected.frames != got["frames"]):
        ref = model if choice.kind == "cpu" else runtime.Model(cfg.model.cpu_fallback or cfg.model.path,
                                                               threads=cfg.model.threads)
        rec = answers(ref)
        expected = selftest.Expected(rec["outputs"], rec["frames"], "the CPU, now (nothing recorded yet)")
    handle = SimpleNamespace(info={"selftest": got, "task": cfg.model.task, "model": model.describe()})
    tolerance = cfg.model.selftest.tolerance_for(choice.kind)
    v = selftest.check(handle, expected, tolerance, cfg.model.score_threshold)
    print(f"selftest     {'pass' if v.passed else 'FAIL'} on {choice.kind}: max diff {v.max_diff:g} step(s) "
          f"(tolerance {tolerance:g}) against {expected.source}, {v.ms:g} ms"
          + (f": {v.reason}" if v.reason else ""))
    if not v.passed and choice.kind == "cpu":
        print(f"edged check: model {cfg.model.path}: the self-test on the CPU does not give the expected outputs",
              file=sys.stderr)
        return EX_CONFIG
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from edged import status

    path = args.socket
    if not path:
        path = _load(args).status.socket
    while True:
        st = status.query(path, timeout=args.timeout)
        if args.json:
            print(json.dumps(st, indent=None if args.watch else 2))
        else:
            if args.watch:
                print("\033[H\033[2J", end="")
            print(status.render(st))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def cmd_send(args: argparse.Namespace) -> int:
    from edged import userfiles
    from edged.send import send_frames

    cfg = _load(args)
    try:  # /dev/zero or a huge file must not fill memory: the daemon answers too_large past this anyway
        payload = userfiles.read_bytes(args.file, cfg.queue.max_frame_bytes, regular=False)
    except userfiles.FileRefused as exc:
        print(f"edged send: {exc}", file=sys.stderr)
        return 66
    if args.count < 1 or args.retries < 0 or args.timeout <= 0 or args.rate < 0 or args.linger < 0:
        print("edged send: --count >= 1, --retries >= 0, --timeout > 0, --rate >= 0, --linger >= 0",
              file=sys.stderr)
        return 2
    one = args.count == 1

    def show(result: dict[str, object]) -> None:
        print(json.dumps(result, indent=2) if one else json.dumps(result), flush=True)

    rep = send_frames(cfg, payload, args.stream, args.timeout, count=args.count, retries=args.retries,
                      rate=args.rate, fleet=args.fleet, linger=args.linger, on_result=show)
    summary = rep.summary()
    if args.report:
        try:
            with open(args.report, "w", encoding="utf-8") as fh:
                json.dump(rep.as_json(), fh)
        except OSError as exc:
            print(f"edged send: --report {args.report}: {exc.strerror}", file=sys.stderr)
    if not one:
        print("edged send: " + ", ".join(f"{k} {v}" for k, v in summary.items()), file=sys.stderr)
    if summary["unanswered"]:
        where = f"{cfg.mqtt.share.prefix if args.fleet and cfg.mqtt.share else cfg.prefix}/in/{args.stream}"
        tries = f" after {args.retries} re-send(s) each" if args.retries else ""
        print(f"edged send: {summary['unanswered']} of {summary['sent']} frame(s) got no result from edged on "
              f"{where} within {args.timeout:g} s{tries}", file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edged.bench import run_bench

    cfg = _load(args)
    # native libraries print notices on stdout (LiteRT's GPU path: "Loaded OpenCL library"): keep it clean
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        report = run_bench(cfg, frames=args.frames, with_e2e=not args.no_e2e, window=max(1, args.window),
                           open_loop_s=args.open_loop_s)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edged", description="Edge inference daemon: TFLite models over MQTT.")
    p.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("-c", "--config", help="config file (default $EDGED_CONFIG, else /etc/edged/edged.yaml)")
        return sp

    add("run", "run the daemon in the foreground").set_defaults(fn=cmd_run)
    add("check", "validate the config, load the model once, report").set_defaults(fn=cmd_check)
    s = add("status", "ask a running daemon for its state")
    s.add_argument("--json", action="store_true", help="print the status JSON")
    s.add_argument("--socket", help="status socket path (default: status.socket from the config)")
    s.add_argument("--timeout", type=_positive, default=5.0, metavar="S",
                   help="give up (exit 69) when no full answer came within S seconds (default 5)")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="S",
                   help="refresh every S seconds (default 2)")
    s.set_defaults(fn=cmd_status)
    s = add("send", "publish a frame and print its result")
    s.add_argument("file", help="image file (JPEG, PNG, BMP) or raw tensor file")
    s.add_argument("--stream", default="cli")
    s.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for a result (also the frame's Message Expiry) before a re-send")
    s.add_argument("--retries", type=int, default=0,
                   help="re-send a frame with no result this many times, under the same frame_id")
    s.add_argument("--fleet", action="store_true", help="send to the fleet (mqtt.share.prefix), not this device")
    s.add_argument("--count", type=int, default=1, help="send the file as this many frames (one result per line)")
    s.add_argument("--rate", type=float, default=0.0, help="frames per second with --count (0: all at once)")
    s.add_argument("--linger", type=float, default=0.0,
                   help="listen this many seconds after the last result, counting second answers")
    s.add_argument("--report", metavar="FILE", help="write a JSON report: summary and each frame's timings")
    s.set_defaults(fn=cmd_send)
    s = add("bench", "measure raw interpreter vs. daemon paths")
    s.add_argument("--json", action="store_true")
    s.add_argument("--frames", type=int, default=200)
    s.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run through a broker")
    s.add_argument("--window", type=int, default=2, help="frames in flight per path (more with several workers)")
    s.add_argument("--open-loop-s", type=float, default=2.0,
                   help="seconds of fixed-rate frames at each load (25/50/75/100%% of capacity) end to end")
    s.set_defaults(fn=cmd_bench)
    from edged import modelcli

    modelcli.add_parser(sub, add)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, ModelError) as exc:
        print(f"edged {args.cmd}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except UnavailableError as exc:
        print(f"edged {args.cmd}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except EdgedError as exc:
        print(f"edged {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

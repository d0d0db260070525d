"""`avatar`: the one command line of the project (broker, topics, stages, demo, stack)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from backbone import logs

log = logging.getLogger("avatar.cli")


def _cmd_kafka(args: argparse.Namespace) -> int:
    from backbone import broker

    settings = broker.BrokerSettings.from_env()
    if args.home:
        settings = broker.BrokerSettings.from_env(
            {**os.environ, "AVATAR_KAFKA_HOME": args.home})
    if args.action == "start":
        print(broker.start(settings))
    elif args.action == "stop":
        print("stopped" if broker.stop(settings) else "not running")
    else:
        st = broker.status(settings)
        print(f"running={st.running} answering={st.answering} pid={st.pid} "
              f"bootstrap={st.bootstrap}")
        return 0 if st.answering else 3
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from backbone.runtime import provision_topics
    from backbone.settings import Settings
    from backbone.stages import PIPELINE

    settings = Settings.from_env()
    for name in provision_topics(settings, PIPELINE):
        print(name)
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from backbone.runtime import StageRunner
    from backbone.settings import Settings
    from backbone.stages import load_stage

    settings = Settings.from_env()
    runner = StageRunner(load_stage(args.name), settings)
    stop = threading.Event()
    # SIGTERM/SIGINT: finish the record in hand, checkpoint, commit, exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    runner.run(stop)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from backbone.demo import run_demo

    try:
        out = run_demo(text=args.text, output=Path(args.output), bus=args.bus,
                       data_dir=Path(args.data_dir), fps=args.fps, resolution=args.resolution,
                       voice=args.voice, audio=Path(args.audio) if args.audio else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"avatar demo: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _cmd_portrait(args: argparse.Namespace) -> int:
    from processors.portrait import (DEFAULT_PORTRAIT, PortraitError, build_pack,
                                     check_portrait_name, portrait_dir, portrait_names,
                                     portrait_path)

    if args.action == "list":
        for name in portrait_names():
            path = portrait_path(name)
            print(f"{name}\t{path if path is not None else '(shipped)'}")
        return 0
    photo_path = Path(args.photo)
    name = check_portrait_name(args.name or photo_path.stem)
    if name == DEFAULT_PORTRAIT:
        raise PortraitError(f"{name!r} is the shipped portrait; choose another --name")
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(photo_path) as img:
            photo = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise PortraitError(f"cannot read {photo_path} as an image: {exc}") from exc
    try:
        pack = build_pack(photo, name=name)
    except PortraitError as exc:
        raise PortraitError(f"{photo_path}: {exc}") from exc
    out = portrait_dir() / f"{name}.npz"
    pack.save(out)
    print(out)
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from backbone.settings import Settings
    from gateway import auth
    from gateway.app import Gateway, create_app

    settings = Settings.from_env()
    if os.environ.get("AVATAR_ICE_LOOPBACK", "") in ("1", "true", "yes"):
        from gateway.webrtc import loopback_only

        loopback_only()  # one machine: WebRTC media stays on 127.0.0.1
    gw = Gateway(settings, auth.from_env(), demo_key=os.environ.get("AVATAR_DEMO_KEY", ""))
    print(f"gateway on http://{args.host}:{args.port}/", flush=True)
    # Open WebSockets and WebRTC peers get 5 s to close on SIGTERM, then the process exits.
    uvicorn.run(create_app(gw), host=args.host, port=args.port, log_level="warning",
                ws_max_size=1 << 20, timeout_graceful_shutdown=5)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from backbone import integrity
    from backbone.settings import Settings
    from replay.verify import verify_session

    settings = Settings.from_env()
    bus = settings.open_bus()
    if args.action == "verify":
        key = bytes.fromhex(args.session_key) if args.session_key else \
            integrity.session_key(args.session)
        report = verify_session(bus, settings, args.session, key)
        if report.records == 0:
            print(f"avatar replay verify: no records of session {args.session!r} on "
                  f"{settings.bus} (topics {settings.topic_prefix}*)", file=sys.stderr)
            return 2
        print(report.text())
        return 0 if report.ok else 1
    if args.action == "key":
        print(integrity.session_key(args.session).hex())
        return 0
    if args.action == "erase":
        from replay.erase import erase_session

        print(erase_session(bus, settings, args.session, by=args.by))
        return 0
    if args.action == "export":
        from replay.export import ExportError, export_session

        try:
            index = None
            if settings.bus == "kafka":
                from replay.index import lookup

                index = lookup(bus, settings, args.session)  # seek, if the index runs
            done = export_session(bus, settings, args.session,
                                  Path(args.output or args.session), index)
        except ExportError as exc:
            print(f"avatar replay export: {exc}", file=sys.stderr)
            return 2
        print(f"{done.directory}: {done.frames} frames, {done.audio_s:.1f} s of speech, "
              f"integrity {'intact' if done.verified else 'NOT intact (see report.html)'}")
        for line in done.missing:
            print(f"missing: {line}")
        return 0 if done.verified else 1
    if args.action == "rerender":
        import json

        from replay.rerender import RerenderError, rerender_session

        try:
            index = None
            if settings.bus == "kafka":
                from replay.index import lookup

                index = lookup(bus, settings, args.session)
            remade = rerender_session(bus, settings, args.session, index, mode=args.mode)
        except Exception as exc:  # exit 1 means "differs": anything that stopped it is 2
            if not isinstance(exc, RerenderError):
                log.debug("rerender failed", exc_info=True)
                exc = RerenderError(f"failed: {type(exc).__name__}: {exc}")
            print(f"avatar replay rerender: {exc}", file=sys.stderr)
            if args.json:  # machines get the reason too, not just the exit code
                Path(args.json).write_text(json.dumps(
                    {"session": args.session, "identical": None, "error": str(exc)}) + "\n")
            return 2
        print(remade.text())
        if args.json:
            remade.write_json(args.json)
        return 0 if remade.identical else 1
    return 2


def _cmd_index(args: argparse.Namespace) -> int:
    import faust

    from backbone.settings import Settings
    from replay.index import make_app

    settings = Settings.from_env()
    if settings.bus != "kafka":
        print("avatar index: the session index runs on Kafka (AVATAR_BUS=kafka)", file=sys.stderr)
        return 2
    app = make_app(settings)
    app.finalize()
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from backbone.stack import up

    # Flags become the env names of the settings, which the stage processes inherit.
    for flag, env in (("autoscale", "AVATAR_AUTOSCALE"), ("slo_ms", "AVATAR_AUTOSCALE_SLO_MS"),
                      ("min_replicas", "AVATAR_AUTOSCALE_MIN"),
                      ("max_replicas", "AVATAR_AUTOSCALE_MAX")):
        value = getattr(args, flag)
        if value not in (None, False):
            os.environ[env] = "1" if value is True else str(value)
    up(Path(args.run_dir), foreground=args.foreground)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from backbone.stack import down

    down(Path(args.run_dir), stop_broker=not args.keep_broker)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatar", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("AVATAR_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kafka", help="run the local single-node Kafka broker")
    k.add_argument("action", choices=["start", "stop", "status"])
    k.add_argument("--home", default="", help="data dir (default: $AVATAR_KAFKA_HOME)")
    k.set_defaults(fn=_cmd_kafka)

    t = sub.add_parser("topics", help="provision topics")
    t.add_argument("action", choices=["create"])
    t.set_defaults(fn=_cmd_topics)

    s = sub.add_parser("stage", help="run one stage as a process on the configured bus")
    s.add_argument("name", help="asr | dialogue | tts | align | animate | render | module:Class")
    s.set_defaults(fn=_cmd_stage)

    d = sub.add_parser("demo", help="text -> speech -> motion -> video, written to an MP4")
    d.add_argument("--text", default="Hello! I am an open source avatar. "
                   "My lips move with every word I say.")
    d.add_argument("-o", "--output", default="demo.mp4")
    d.add_argument("--bus", choices=["embedded", "kafka"], default="embedded")
    d.add_argument("--data-dir", default="avatar-data")
    d.add_argument("--fps", type=int, default=25)
    d.add_argument("--resolution", type=int, default=512, choices=[256, 512, 768])
    d.add_argument("--voice", default="en-us")
    d.add_argument("--audio", default="", metavar="WAV",
                   help="animate this speech (any voice) instead of speaking --text")
    d.set_defaults(fn=_cmd_demo)

    pt = sub.add_parser("portrait", help="add or list portraits (packs in $AVATAR_PORTRAIT_DIR)")
    pt_sub = pt.add_subparsers(dest="action", required=True)
    pa = pt_sub.add_parser("add", help="build a portrait pack from a photo of one face")
    pa.add_argument("photo", help="PNG/JPEG with one face, at least ~100 px across")
    pa.add_argument("--name", default="", help="portrait name (default: the file's stem)")
    pt_sub.add_parser("list", help="the shipped portrait and every added one")
    pt.set_defaults(fn=_cmd_portrait)

    g = sub.add_parser("gateway", help="REST + WebSocket + WebRTC gateway in front of the bus")
    g.add_argument("--host", default=os.environ.get("AVATAR_GATEWAY_HOST", "127.0.0.1"))
    g.add_argument("--port", type=int, default=int(os.environ.get("AVATAR_GATEWAY_PORT", "8080")))
    g.set_defaults(fn=_cmd_gateway)

    r = sub.add_parser("replay", help="auditor tools over a session's log")
    r.add_argument("action", choices=["verify", "export", "rerender", "erase", "key"],
                   help="verify: check every integrity link and name tampered records; "
                        "export: MP4 as streamed + captions + manifest + HTML report; "
                        "rerender: run animate and render again from the logged inputs and "
                        "name every motion or video frame that differs; "
                        "erase: delete the session's data key (AVATAR_SEAL) and record it; "
                        "key: print the session's verification key (give it to an auditor)")
    r.add_argument("session")
    r.add_argument("-o", "--output", default="", help="export directory (default: SESSION)")
    r.add_argument("--by", default=os.environ.get("USER", "operator"),
                   help="who asked for the erasure (recorded in the audit trail)")
    r.add_argument("--session-key", default="", help="hex key from `replay key` (default: "
                   "derived from AVATAR_INTEGRITY_KEY)")
    r.add_argument("--json", default="", metavar="PATH",
                   help="rerender: also write the comparison as JSON here")
    r.add_argument("--mode", choices=["auto", "offline", "live"], default="auto",
                   help="rerender: how animate ran (auto: live if the log has idle frames)")
    r.set_defaults(fn=_cmd_replay)

    ix = sub.add_parser("index", help="run the session index (faust table, Kafka only)")
    ix.set_defaults(fn=_cmd_index)

    u = sub.add_parser("up", help="broker, topics and every stage as its own process")
    u.add_argument("--run-dir", default="avatar-data/run")
    u.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops")
    u.add_argument("--autoscale", action="store_true",
                   help="add/remove stage processes on p95 latency (AVATAR_AUTOSCALE_*)")
    u.add_argument("--slo-ms", type=float, default=None, help="p95 latency SLO (default 200)")
    u.add_argument("--min-replicas", type=int, default=None, help="per stage (default 1)")
    u.add_argument("--max-replicas", type=int, default=None, help="per stage (default 4)")
    u.set_defaults(fn=_cmd_up)

    dn = sub.add_parser("down", help="stop what `avatar up` started")
    dn.add_argument("--run-dir", default="avatar-data/run")
    dn.add_argument("--keep-broker", action="store_true")
    dn.set_defaults(fn=_cmd_down)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for the user; details in the log
        log.debug("command failed", exc_info=True)
        print(f"avatar {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""A Touchpoint external channel adapter (touchpoint.adapter.v1.ChannelAdapter) for tests.

Run with the generated stubs on PYTHONPATH (tests generate them with grpc_tools.protoc):

    python adapter.py --port 7000 --record deliveries.jsonl

Describe answers name "py-test-adapter" and the actions below. Deliver appends one JSON
line per call to --record (flushed at once) and answers by action:

- send_message: OUTCOME_OK;
- flaky: OUTCOME_RETRYABLE (retry_after_ms 200) on attempt 1, OUTCOME_OK after;
- refuse: OUTCOME_PERMANENT "recipient refused by the python adapter";
- throttle: OUTCOME_RETRYABLE with rate_limited (retry_after_ms 1000): the provider's
  "slow down";
- anything else is not in Describe's list (the worker fails such steps itself).
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc

from touchpoint.adapter.v1 import adapter_pb2, adapter_pb2_grpc

NAME = "py-test-adapter"
VERSION = "1.0.0"
ACTIONS = ["send_message", "flaky", "refuse", "throttle"]


class Adapter(adapter_pb2_grpc.ChannelAdapterServicer):
    def __init__(self, record_path):
        self._record = open(record_path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def Describe(self, request, context):
        return adapter_pb2.DescribeResponse(name=NAME, version=VERSION, actions=ACTIONS)

    def Deliver(self, request, context):
        metadata = dict(context.invocation_metadata())
        line = {
            "run_id": request.run_id,
            "playbook": request.playbook,
            "version": request.version,
            "step_id": request.step_id,
            "action": request.action,
            "channel": request.channel,
            "attempt": request.attempt,
            "message": request.message,
            "params": json.loads(request.params_json or "{}"),
            "contact_id": request.contact.id,
            "identities": dict(request.contact.identities),
            "idempotency_key": request.idempotency_key,
            "traceparent": request.traceparent,
            "traceparent_metadata": metadata.get("traceparent", ""),
            "deadline_ms": request.deadline_ms,
            "time_remaining": context.time_remaining(),
        }
        with self._lock:
            self._record.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._record.flush()
        Outcome = adapter_pb2
        if request.action == "flaky" and request.attempt <= 1:
            return adapter_pb2.DeliverResponse(
                outcome=Outcome.OUTCOME_RETRYABLE,
                detail="python adapter busy",
                retry_after_ms=200,
            )
        if request.action == "throttle":
            return adapter_pb2.DeliverResponse(
                outcome=Outcome.OUTCOME_RETRYABLE,
                detail="python adapter rate limited",
                retry_after_ms=1000,
                rate_limited=True,
            )
        if request.action == "refuse":
            return adapter_pb2.DeliverResponse(
                outcome=Outcome.OUTCOME_PERMANENT,
                detail="recipient refused by the python adapter",
            )
        return adapter_pb2.DeliverResponse(
            outcome=Outcome.OUTCOME_OK,
            detail=f"sent by {NAME} (attempt {request.attempt})",
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    adapter_pb2_grpc.add_ChannelAdapterServicer_to_server(Adapter(args.record), server)
    if server.add_insecure_port(f"127.0.0.1:{args.port}") == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    server.start()
    print(f"adapter listening on 127.0.0.1:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    server.stop(grace=1)


if __name__ == "__main__":
    main()

"""A real SMTP server (aiosmtpd) for Touchpoint's tests.

    python smtp_server.py --port 2525 --tls starttls|implicit|none --cert C --key K \
        --maildir DIR [--username U --password P]

Writes every message it accepts to DIR/accepted/<n>.eml and every message it turns away
at DATA to DIR/rejected/<n>.eml. Answers by the first recipient's local part:

- starts with "tempfail-once": 451 the first time that address sends, then accepted;
- starts with "throttled-once": 451 "sending rate limit exceeded" the first time, then
  accepted;
- starts with "tempfail": always 451;
- starts with "reject": always 550;
- anything else: accepted.

With --username, AUTH (PLAIN/LOGIN, only after TLS) is required and checked.
"""

import argparse
import asyncio
import itertools
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    def __init__(self, maildir):
        self.maildir = maildir
        self.seen = set()
        self.counter = itertools.count(1)
        for sub in ("accepted", "rejected"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)

    def _write(self, folder, envelope):
        n = next(self.counter)
        path = os.path.join(self.maildir, folder, f"{n:05}.eml")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.replace(tmp, path)

    async def handle_DATA(self, server, session, envelope):
        rcpt = envelope.rcpt_tos[0] if envelope.rcpt_tos else ""
        local = rcpt.split("@", 1)[0].lower()
        if local.startswith("tempfail-once"):
            if rcpt not in self.seen:
                self.seen.add(rcpt)
                self._write("rejected", envelope)
                return "451 4.3.0 try again later"
        elif local.startswith("throttled-once"):
            if rcpt not in self.seen:
                self.seen.add(rcpt)
                self._write("rejected", envelope)
                return "451 4.7.1 sending rate limit exceeded, slow down"
        elif local.startswith("tempfail"):
            self._write("rejected", envelope)
            return "451 4.3.0 try again later"
        elif local.startswith("reject"):
            self._write("rejected", envelope)
            return "550 5.1.1 mailbox unavailable"
        self._write("accepted", envelope)
        return "250 OK"


def authenticator(username, password):
    def check(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = auth_data.login.decode() == username and auth_data.password.decode() == password
        return AuthResult(success=ok)

    return check


async def serve(args):
    context = None
    if args.tls != "none":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    handler = Handler(args.maildir)
    options = {"hostname": "localhost"}
    if args.username:
        options["authenticator"] = authenticator(args.username, args.password)
        options["auth_require_tls"] = args.tls != "none"
        options["auth_required"] = True
    if args.tls == "starttls":
        options["tls_context"] = context
        options["require_starttls"] = True

    def factory():
        return SMTP(handler, **options)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory,
        host="127.0.0.1",
        port=args.port,
        ssl=context if args.tls == "implicit" else None,
    )
    print(f"smtp listening on 127.0.0.1:{args.port} ({args.tls})", flush=True)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", choices=["starttls", "implicit", "none"], required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password")
    args = parser.parse_args()
    if args.tls != "none" and not (args.cert and args.key):
        sys.exit("--cert and --key are required with TLS")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

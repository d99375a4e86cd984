#!/usr/bin/env python3
"""Checks a TLS-RPT report mail Moat sent, with tools that are not Moat's: its DKIM
signature with dkimpy (against the TXT record `moat dkim generate` printed), and its gzip
JSON attachment against the RFC 8460 schema with jsonschema. Prints one JSON line:
{"dkim": true|false, "schema_errors": [...], "report": {...}}.

usage: check_report_mail.py MAIL_FILE DKIM_RECORD_FILE SCHEMA_FILE
"""
import email
import email.policy
import gzip
import json
import re
import sys

import dkim
import jsonschema

mail_path, record_path, schema_path = sys.argv[1:4]
raw = open(mail_path, "rb").read()
# The DNS record as printed: NAME. IN TXT "part" "part" ...: the value is the parts joined.
printed = open(record_path).read()
value = "".join(re.findall(r'"([^"]*)"', printed)).encode()


def dnsfunc(name, timeout=5):
    return value


ok = dkim.verify(raw, dnsfunc=dnsfunc, tlsrpt="strict")
msg = email.message_from_bytes(raw, policy=email.policy.default)
report = None
for part in msg.walk():
    if part.get_content_type() == "application/tlsrpt+gzip":
        report = json.loads(gzip.decompress(part.get_payload(decode=True)))
schema = json.load(open(schema_path))
errors = []
if report is None:
    errors.append("no application/tlsrpt+gzip part")
else:
    v = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in v.iter_errors(report)]
print(json.dumps({"dkim": bool(ok), "schema_errors": errors, "report": report,
                  "content_type": msg.get("Content-Type", ""),
                  "filename": next((p.get_filename() for p in msg.walk() if p.get_filename()), None)}))

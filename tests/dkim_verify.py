"""Verifies the first DKIM signature of a message with dkimpy (Debian's python3-dkim), the
independent verifier for tests/dkim.rs.

    python3 tests/dkim_verify.py MESSAGE_FILE RECORD_FILE

RECORD_FILE holds the key record's TXT value (the strings joined); every key lookup answers
it. The message is checked as an RFC 8460 report (tlsrpt="strict": the record must say
s=tlsrpt). Exit status 0 verified, 1 not verified, 3 dkimpy missing.
"""

import sys

try:
    import dkim
except ImportError as e:
    print(f"dkimpy is not installed (apt-get install python3-dkim): {e}", file=sys.stderr)
    sys.exit(3)

with open(sys.argv[1], "rb") as f:
    message = f.read()
with open(sys.argv[2], "rb") as f:
    record = f.read().strip()

ok = dkim.verify(message, dnsfunc=lambda name, timeout=5: record, tlsrpt="strict")
print(ok)
sys.exit(0 if ok else 1)

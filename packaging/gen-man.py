#!/usr/bin/env python3
"""Writes the moat(1) man page from the CLI's own help text.

    packaging/gen-man.py BINARY OUTPUT

Runs `BINARY --help` and `BINARY <command>... --help` for every subcommand, found by
reading the "Commands:" section of each help output (recursively; `help` is skipped), and
turns the text into roff: NAME and DESCRIPTION from the top-level long help, SYNOPSIS from
every command's usage line, OPTIONS (the global ones), COMMANDS with one subsection per
command, then ENVIRONMENT, FILES and SEE ALSO. A new subcommand appears in the page without
any change here.

The help text is clap's: paragraphs of prose, a "Usage:" line, and sections introduced by a
line such as "Options:" whose entries are indented (the description either on the same line
after two spaces, or on the following lines indented further). Sections other than
Commands, Arguments and ...Options (such as "Examples:") are copied as literal text.
Standard library only.
"""

import datetime
import os
import re
import subprocess
import sys

ENTRY_SECTIONS = ("Commands", "Arguments")


def run_help(binary, path):
    env = dict(os.environ, COLUMNS="100", NO_COLOR="1", TERM="dumb")
    out = subprocess.run(
        [binary, *path, "--help"], env=env, check=True, capture_output=True, text=True
    ).stdout
    return [line.rstrip() for line in out.splitlines()]


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def parse_help(lines):
    """Splits help text into blocks: ("prose", [lines]), ("usage", text),
    ("entries", heading, [(spec, [paragraph lines...])]) and ("literal", heading, [lines])."""
    blocks = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line.startswith("Usage: "):
            text = line[len("Usage: "):]
            i += 1
            while i < n and lines[i].strip() and indent_of(lines[i]) > 0:
                text += " " + lines[i].strip()
                i += 1
            blocks.append(("usage", text))
            continue
        m = re.fullmatch(r"([A-Z][A-Za-z0-9 ]*):", line)
        if m and i + 1 < n and lines[i + 1].startswith(" "):
            heading = m.group(1)
            i += 1
            body = []
            # The section runs over indented lines and blank lines between them.
            while i < n and (not lines[i].strip() or lines[i].startswith(" ")):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            if heading in ENTRY_SECTIONS or heading.endswith("Options") or heading.endswith("options"):
                blocks.append(("entries", heading, parse_entries(body)))
            else:
                blocks.append(("literal", heading, body))
            continue
        para = []
        while i < n and lines[i].strip() and not lines[i].startswith("Usage: "):
            para.append(lines[i].strip())
            i += 1
        blocks.append(("prose", para))
    return blocks


def parse_entries(body):
    """Entries start at indentation 2 (or 6: a long option without a short one); deeper
    lines continue the description; blank lines separate its paragraphs."""
    entries = []
    for line in body:
        if not line.strip():
            if entries:
                entries[-1][1].append([])
            continue
        if indent_of(line) <= 6:
            text = line.strip()
            m = re.match(r"(\S+(?: \S+)*?)(?:\s{2,}(.*))?$", text)
            spec, desc = m.group(1), m.group(2)
            entries.append((spec, [[desc]] if desc else [[]]))
        elif entries:
            entries[-1][1][-1].append(line.strip())
    # Drop empty paragraphs (separators between entries).
    return [(spec, [p for p in paras if p]) for spec, paras in entries]


def subcommands(blocks):
    names = []
    for b in blocks:
        if b[0] == "entries" and b[1] == "Commands":
            for spec, _ in b[2]:
                name = spec.split()[0]
                if name != "help":
                    names.append(name)
    return names


# ---- roff ----------------------------------------------------------------------------

def esc(text, code=False):
    """Escapes text for roff. In code (option names, commands, examples) every `-` is a
    minus sign (\\-), so it can be searched for and copied."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\e")
        elif ch == "-" and code:
            out.append("\\-")
        elif ch == "'":
            out.append("\\(aq")
        elif ch == "`":
            out.append("\\(ga")
        elif ord(ch) > 127:
            out.append("\\[u%04X]" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def line_safe(text):
    """A text line must not start with a control character (`.` or `'`)."""
    if text.startswith(".") or text.startswith("'"):
        return "\\&" + text
    return text


def inline(text):
    """Prose with `code spans` in bold (a span may run over a line break)."""
    parts = re.split(r"`([^`]+)`", text)
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append("\\fB" + esc(part, code=True) + "\\fR")
        else:
            out.append(esc(part))
    return "".join(out)


def prose_lines(lines):
    """Lines of one paragraph, to be filled by roff. A line opening with `[` (clap's
    [default: ...]) or `- ` (a list of possible values) starts on a new output line."""
    segments = []
    for k, line in enumerate(lines):
        if not segments or line.startswith("[") or line.startswith("- "):
            segments.append([])
        segments[-1].append(line)
    out = []
    for k, seg in enumerate(segments):
        if k:
            out.append(".br")
        out.extend(line_safe(l) for l in inline("\n".join(seg)).split("\n"))
    return out


def spec_roff(spec):
    """`-c, --config <FILE>` -> bold options, italic placeholders."""
    words = []
    for word in spec.split(" "):
        trail = ""
        if word.endswith(","):
            word, trail = word[:-1], ","
        if word.startswith("-"):
            words.append("\\fB" + esc(word, code=True) + "\\fR" + trail)
        elif word[:1] in "<[" or word.isupper():
            words.append("\\fI" + esc(word, code=True) + "\\fR" + trail)
        else:
            words.append("\\fB" + esc(word, code=True) + "\\fR" + trail)
    return line_safe(" ".join(words))


def usage_roff(usage, path):
    """The usage line with the command words in bold."""
    prog = " ".join(["moat", *path])
    rest = usage[len(prog):] if usage.startswith(prog) else " " + usage
    return line_safe("\\fB" + esc(prog, code=True) + "\\fR" + esc(rest, code=True))


def entries_roff(entries, skip=()):
    out = []
    for spec, paras in entries:
        if spec in skip:
            continue
        out.append(".TP")
        out.append(spec_roff(spec))
        for k, para in enumerate(paras):
            if k:
                out.append(".IP")
            out.extend(prose_lines(para))
    return out


def literal_roff(heading, body):
    dedent = min((indent_of(l) for l in body if l.strip()), default=0)
    out = [".PP", "\\fB" + esc(heading) + ":\\fR", ".RS 4", ".nf"]
    for line in body:
        out.append(line_safe(esc(line[dedent:], code=True)) if line.strip() else "")
    out += [".fi", ".RE"]
    return out


def blocks_roff(blocks, path, skip_specs, with_usage=True):
    out = []
    for b in blocks:
        if b[0] == "prose":
            out.append(".PP")
            out.extend(prose_lines(b[1]))
        elif b[0] == "usage":
            if with_usage:
                out += [".PP", usage_roff(b[1], path)]
        elif b[0] == "entries":
            entries = [e for e in b[2] if e[0] not in skip_specs]
            if b[1] == "Commands":
                entries = [e for e in entries if e[0].split()[0] != "help"]
            if not entries:
                continue
            out += [".PP", "\\fB" + esc(b[1]) + ":\\fR", ".RS 4"]
            out += entries_roff(entries)
            out.append(".RE")
        elif b[0] == "literal":
            out += literal_roff(b[1], b[2])
    return out


def collect(binary, path=()):
    """Depth-first: (path, blocks) for this command and every subcommand."""
    blocks = parse_help(run_help(binary, list(path)))
    found = [(tuple(path), blocks)]
    for name in subcommands(blocks):
        found += collect(binary, (*path, name))
    return found


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: gen-man.py BINARY OUTPUT")
    binary, output = sys.argv[1], sys.argv[2]
    version = subprocess.run(
        [binary, "--version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    commands = collect(binary)
    top = commands[0][1]
    has_children = {p[:-1] for p, _ in commands if p}

    prose = [b for b in top if b[0] == "prose"]
    if not prose:
        sys.exit("gen-man.py: the top-level help has no description")
    # "Moat: a mail transfer agent built around ..." -> "a mail transfer agent built around ..."
    summary = re.sub(r"^\w+:\s*", "", prose[0][1][0]).rstrip(".")
    top_options = [b for b in top if b[0] == "entries" and b[1].endswith("Options")]
    global_specs = {spec for b in top_options for spec, _ in b[2]}

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        if epoch
        else datetime.datetime.now(datetime.timezone.utc)
    )

    out = [
        '.\\" Generated by packaging/gen-man.py from `moat --help`; do not edit.',
        '.TH MOAT 1 "%s" "%s" "User Commands"' % (when.strftime("%Y-%m-%d"), esc(version)),
        ".nh",  # no hyphenation: option names and host names stay whole
        ".ad l",
        ".SH NAME",
        "moat \\- " + inline(summary),
        ".SH SYNOPSIS",
    ]
    first = True
    for path, blocks in commands:
        if path in has_children and path:
            continue  # a group: its subcommands' lines say more
        for b in blocks:
            if b[0] == "usage":
                if not first:
                    out.append(".br")
                out.append(usage_roff(b[1], list(path)))
                first = False

    out.append(".SH DESCRIPTION")
    for para in prose:
        out.append(".PP")
        out.extend(prose_lines(para[1]))
    out.append(".PP")
    out.append(
        "Every command prints its own manual with \\fB\\-\\-help\\fR (a summary with "
        "\\fB\\-h\\fR); this page collects them."
    )

    if top_options:
        out.append(".SH OPTIONS")
        out.append("These options are accepted by every command.")
        for b in top_options:
            out += entries_roff(b[2])

    out.append(".SH COMMANDS")
    for path, blocks in commands[1:]:
        out.append('.SS "%s"' % esc(" ".join(["moat", *path]), code=True))
        out += blocks_roff(blocks, list(path), global_specs)

    out += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBMOAT_LOG\\fR",
        "Which log lines are written, as a tracing filter: a level (\\fBerror\\fR, "
        "\\fBwarn\\fR, \\fBinfo\\fR, \\fBdebug\\fR, \\fBtrace\\fR) or a list of "
        "\\fItarget\\fR=\\fIlevel\\fR directives such as \\fBinfo,moat::outbound=debug\\fR. "
        "Default: \\fBinfo\\fR.",
        ".SH FILES",
        ".TP",
        "\\fI/etc/moat/moat.toml\\fR",
        "The configuration the \\fBmoat.service\\fR systemd unit runs with (a production "
        "gateway example as installed). Check it with \\fBmoat config check "
        "/etc/moat/moat.toml\\fR after every change.",
        ".TP",
        "\\fI/etc/moat/\\fR",
        "Configuration, certificates and keys (owner root, group moat, mode 0750); "
        "read-only for the service.",
        ".TP",
        "\\fI/var/lib/moat/\\fR",
        "The data directory (\\fBdata_dir\\fR): the queue (\\fIspool/\\fR), the users file, "
        "cached MTA\\-STS policies (\\fIsts/\\fR) and the admin socket used by \\fBmoat "
        "queue\\fR. Owned by the moat user; the only place the service may write.",
        ".TP",
        "\\fI/usr/share/doc/moat/examples/moat.toml\\fR",
        "Every configuration key, with its default and what it does.",
        ".TP",
        "\\fI/usr/lib/systemd/system/moat.service\\fR",
        "The systemd unit: runs \\fBmoat serve\\fR as the moat user with only the "
        "capability to bind ports below 1024. \\fBsystemctl reload moat\\fR reloads the "
        "certificates.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBsystemd.exec\\fR(5), "
        "\\fI/usr/share/doc/moat/README.md\\fR.",
        ".PP",
        "RFC 5321 (SMTP), RFC 3207 (STARTTLS), RFC 8314 (implicit TLS), RFC 8461 (MTA\\-STS), "
        "RFC 8460 (TLS reporting), RFC 3464 (delivery status notifications).",
    ]

    text = "\n".join(out) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="ascii") as f:
        f.write(text)
    print("%s: %d commands, %d lines" % (output, len(commands) - 1, text.count("\n")))


if __name__ == "__main__":
    main()

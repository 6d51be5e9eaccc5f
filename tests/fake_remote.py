"""Stand-ins for `pdsh` and `ssh` in tests: DeepSpeed's multi-node runner (pdsh backend) runs each
host's command through them. Each "remote" command runs here, in a fresh login environment (HOME,
USER, LANG and nothing else, as an ssh session starts), so a rank sees only what the runner exports.

  pdsh -S -f N -w host0,host1 <command...>   ->  the command once per host, %n = the host's index, %h = host
  ssh [-o OPT] [-p PORT] host <command...>   ->  the command (the runner's `ssh host hostname` check)
"""
import os
import subprocess
import sys


def fresh_env() -> dict:
    return {k: os.environ[k] for k in ("HOME", "USER", "LANG") if k in os.environ}


def pdsh(args: list[str]) -> int:
    hosts, i = [], 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "-w":
            hosts = args[i + 1].split(",")
        i += 2 if args[i] in ("-w", "-f", "-R", "-l") else 1
    command = " ".join(args[i:])
    print(f"fake pdsh: {len(hosts)} node(s) in fresh environments", flush=True)
    procs = [subprocess.Popen(["bash", "-c", command.replace("%n", str(n)).replace("%h", host)], env=fresh_env())
             for n, host in enumerate(hosts)]
    return max(p.wait() for p in procs)


def ssh(args: list[str]) -> int:
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-o", "-p", "-i", "-l") else 1
    return subprocess.call(["bash", "-c", " ".join(args[i + 1:])], env=fresh_env())


def main(tool: str, args: list[str]) -> int:
    return pdsh(args) if tool == "pdsh" else ssh(args)


def install(bin_dir) -> None:
    """Executables `pdsh` and `ssh` in `bin_dir` (put it first on PATH) that run this module."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for tool in ("pdsh", "ssh"):
        path = Path(bin_dir) / tool
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(here)!r})\nimport fake_remote\n"
                        f"sys.exit(fake_remote.main({tool!r}, sys.argv[1:]))\n")
        path.chmod(0o755)

"""The benchmark tooling's guards: a misconfigured comparison must stop before it runs, not
produce a table whose labels say something the servers did not do."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_peers(peers: str, **env: str) -> subprocess.CompletedProcess:
    """benches/peers.sh up to its first check, with no peer kit (so nothing is set up or started)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OURS_ARGS")}
    environment.update(PEERS=peers, VISIONSERVE_BIN="/bin/true", BENCH_PEERS_SRC="/nonexistent",
                       KIT="/nonexistent-kit", **env)
    return subprocess.run(["bash", str(REPO / "benches" / "peers.sh")], env=environment,
                          capture_output=True, text=True, timeout=60)


def test_peers_refuses_a_label_whose_flags_would_be_dropped():
    # "ours_bf16" without "OURS_ARGS_ours_bf": its trailing digits are read as a copy number, so
    # it would run the defaults under a bf16 name.
    result = run_peers("fastapi_2w ours ours_bf16", OURS_ARGS_ours_bf16="--dtype bf16")
    assert result.returncode == 2, result.stderr
    assert "ours_bf16" in result.stderr and "OURS_ARGS_ours_bf" in result.stderr


def test_peers_accepts_labels_with_their_flags_and_copies():
    result = run_peers("ours ours_bf ours2 ours_bf2", OURS_ARGS_ours_bf="--dtype bf16")
    # Past the label check, it stops at the missing kit.
    assert result.returncode == 1, result.stderr
    assert "no peer kit" in result.stderr

#!/usr/bin/env python3
"""Medians over the rounds of benches/peers.sh: OUT/round-*/<label>.json (the peer kit's load.py output).

Every label starting with 'ours' is visionserve; labels that differ only in trailing digits (ours, ours2)
are one configuration, their runs pooled ('ours_one' shows as visionserve_one). Every other label is a
peer, its copies pooled the same way (ovtuned, ovtuned2). Per concurrency: median req/s and p99 of each server over all its runs, the best peer (highest
median), each configuration / best peer, and the median of the per-round ratios (each round's
configuration median / that round's best peer), which is less exposed to the host's slow spells than a
ratio of medians over the whole pass.

With OUT/round-*/model_alone.md (peers.sh's MODEL_BENCH: visionserve's model alone at batch 8, one copy
with every thread and two copies with half each; the faster of the two is that round's model rate), also
at 8 and more clients: model rate / best peer (how far ahead the model alone ran) and each configuration /
model rate. It is a reference, not a bound: a server can beat it (other batch sizes, copies, hours).
Per-round values are listed in round order. Usage: medians.py OUT  (stdlib only)
"""
import glob
import json
import os
import re
import statistics
import sys


def configuration(label):
    """'ours', 'ours2' -> 'visionserve'; 'ours_one', 'ours_one2' -> 'visionserve_one'."""
    return 'visionserve' + label[len('ours'):].rstrip('0123456789')


def ceiling(rnd):
    """The fastest batch-8 row of the model alone in this round (images/s), if measured."""
    path = os.path.join(rnd, 'model_alone.md')
    if not os.path.exists(path):
        return None
    rates = []
    for line in open(path):
        c = [x.strip() for x in line.strip().strip('|').split('|')]
        if len(c) >= 7 and c[4] == '8' and re.fullmatch(r'[0-9.]+', c[5]):
            rates.append(float(c[5]))
    return max(rates) if rates else None


out = sys.argv[1]
rounds = sorted((p for p in glob.glob(os.path.join(out, 'round-*')) if os.path.isdir(p)), key=lambda p: int(p.rsplit('-', 1)[1]))
runs = {}      # (server, c) -> [(rps, p99, disturbed)]
per_round = {}  # (round, c) -> {config: [rps], peer: rps}
ceilings = {rnd: ceiling(rnd) for rnd in rounds}
for rnd in rounds:
    for path in glob.glob(os.path.join(rnd, '*.json')):
        j = json.load(open(path))
        if 'runs' not in j:
            continue
        ours = j['label'].startswith('ours')
        server = configuration(j['label']) if ours else j['label'].rstrip('0123456789')
        for r in j['runs']:
            c = r['concurrency']
            runs.setdefault((server, c), []).append((r['rps'], r['p99_ms'] or 0.0, r.get('disturbed', False)))
            per_round.setdefault((rnd, c), {}).setdefault(server, []).append(r['rps'])
if not runs:
    sys.exit(f'no results under {out}/round-*')

conc = sorted({c for _, c in runs})
servers = sorted({s for s, _ in runs}, key=lambda s: (not s.startswith('visionserve'), s))
configs = [s for s in servers if s.startswith('visionserve')]
print(f'\n{len(rounds)} round(s) in {out}: median req/s (median p99 ms) [runs; disturbed]')
print(f'{"server":16s}' + ''.join(f'{"c=" + str(c):>28s}' for c in conc))
for s in servers:
    cells = []
    for c in conc:
        v = runs.get((s, c), [])
        if not v:
            cells.append(f'{"-":>28s}')
            continue
        rps = statistics.median(x[0] for x in v)
        p99 = statistics.median(x[1] for x in v)
        bad = sum(x[2] for x in v)
        cells.append(f'{rps:9.1f} ({p99:7.1f} ms) [{len(v)};{bad}]'.rjust(28))
    print(f'{s:16s}' + ''.join(cells))



def best_peer(slot):
    """The round's best peer: the highest median over each peer's runs (its copies pooled)."""
    peers = [statistics.median(v) for k, v in slot.items() if not k.startswith('visionserve')]
    return max(peers) if peers else None


def listed(values):
    """Per-round values, in round order."""
    return ', '.join(f'{x:.2f}' for x in values)


for config in configs:
    print(f'\n{config} / best peer (median req/s):')
    for c in conc:
        ours = runs.get((config, c))
        peers = {s: statistics.median(x[0] for x in v) for (s, cc), v in runs.items() if cc == c and s not in configs}
        if not ours or not peers:
            print(f'  c={c}: missing {config} or peers')
            continue
        o = statistics.median(x[0] for x in ours)
        best = max(peers, key=peers.get)
        ratios = []
        for rnd in rounds:
            slot = per_round.get((rnd, c), {})
            b = best_peer(slot)
            if config in slot and b:
                ratios.append(statistics.median(slot[config]) / b)
        ratio = f'{o / peers[best]:.2f}x' if peers[best] else 'inf'
        line = f'  c={c:<3d} {o:8.1f} / {peers[best]:8.1f} ({best}) = {ratio}'
        if ratios:
            line += f'; median of per-round ratios {statistics.median(ratios):.2f}x [{listed(ratios)}]'
        print(line)

measured = {rnd: b8 for rnd, b8 in ceilings.items() if b8}
if measured:
    print(f'\nvisionserve\'s model alone at batch 8 (the faster layout timed): '
          f'{", ".join(f"{b8:.1f}" for b8 in measured.values())} images/s by round')
    missing = [os.path.basename(rnd) for rnd in rounds if rnd not in measured]
    if missing:
        print(f'  (no model-alone figure for {", ".join(missing)}: those rounds are left out below)')
    for c in (c for c in conc if c >= 8):
        model_vs_peer, reached = [], {config: [] for config in configs}
        for rnd, b8 in measured.items():
            slot = per_round.get((rnd, c), {})
            b = best_peer(slot)
            if b:
                model_vs_peer.append(b8 / b)
            for config in configs:
                if config in slot:
                    reached[config].append(statistics.median(slot[config]) / b8)
        line = f'  c={c:<3d}'
        if model_vs_peer:
            line += f' model / best peer {statistics.median(model_vs_peer):.2f}x [{listed(model_vs_peer)}]'
        for config, values in reached.items():
            if values:
                line += f'; {config} / model {statistics.median(values):.2f}x [{listed(values)}]'
        print(line)

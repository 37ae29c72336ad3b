#!/usr/bin/env python3
"""Medians over the rounds of benches/peers.sh: OUT/round-*/<label>.json (the peer kit's load.py output).

Every label starting with 'ours' is visionserve (all its runs pooled); every other label is a peer.
Per concurrency: median req/s and p99 of each server over all its runs, the best peer (highest median),
visionserve / best peer, and the median of the per-round ratios (each round's ours median / that round's
best peer), which is less exposed to the host's slow spells than a ratio of medians over the whole pass.
Usage: medians.py OUT  (stdlib only)
"""
import glob
import json
import os
import statistics
import sys

out = sys.argv[1]
rounds = sorted((p for p in glob.glob(os.path.join(out, 'round-*')) if os.path.isdir(p)), key=lambda p: int(p.rsplit('-', 1)[1]))
runs = {}      # (server, c) -> [(rps, p99, disturbed)]
per_round = {}  # (round, c) -> {'ours': [rps], peer: rps}
for rnd in rounds:
    for path in glob.glob(os.path.join(rnd, '*.json')):
        j = json.load(open(path))
        if 'runs' not in j:
            continue
        ours = j['label'].startswith('ours')
        server = 'visionserve' if ours else j['label']
        for r in j['runs']:
            c = r['concurrency']
            runs.setdefault((server, c), []).append((r['rps'], r['p99_ms'] or 0.0, r.get('disturbed', False)))
            slot = per_round.setdefault((rnd, c), {})
            if ours:
                slot.setdefault('ours', []).append(r['rps'])
            else:
                slot[server] = r['rps']
if not runs:
    sys.exit(f'no results under {out}/round-*')

conc = sorted({c for _, c in runs})
servers = sorted({s for s, _ in runs}, key=lambda s: (s != 'visionserve', s))
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

print('\nvisionserve / best peer (median req/s):')
for c in conc:
    ours = runs.get(('visionserve', c))
    peers = {s: statistics.median(x[0] for x in v) for (s, cc), v in runs.items() if cc == c and s != 'visionserve'}
    if not ours or not peers:
        print(f'  c={c}: missing ours or peers')
        continue
    o = statistics.median(x[0] for x in ours)
    best = max(peers, key=peers.get)
    ratios = []
    for (rnd, cc), slot in per_round.items():
        if cc != c or 'ours' not in slot or len(slot) < 2:
            continue
        b = max(v for k, v in slot.items() if k != 'ours')
        if b:
            ratios.append(statistics.median(slot['ours']) / b)
    ratio = f'{o / peers[best]:.2f}x' if peers[best] else 'inf'
    line = f'  c={c:<3d} {o:8.1f} / {peers[best]:8.1f} ({best}) = {ratio}'
    if ratios:
        per = ', '.join(f'{x:.2f}' for x in sorted(ratios))
        line += f'; median of per-round ratios {statistics.median(ratios):.2f}x [{per}]'
    print(line)

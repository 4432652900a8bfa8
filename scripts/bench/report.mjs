// Renders a run's results.json as the Markdown tables BENCHMARKS.md is written from:
// `node scripts/bench/report.mjs .cache/bench/run-…/results.json` re-renders an earlier run.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { percentile } from './common.mjs';

const ms = (x) => (Number.isFinite(x) ? `${x >= 100 ? x.toFixed(0) : x.toFixed(1)} ms` : '–');
const sec = (x) => (Number.isFinite(x) ? `${(x / 1000).toFixed(2)} s` : '–');
const ratio = (a, b) => (Number.isFinite(a) && Number.isFinite(b) && b > 0 ? `${(a / b).toFixed(2)}×` : '–');
const p50 = (v) => percentile(v, 50);
const p95 = (v) => percentile(v, 95);
const row = (cells) => `| ${cells.join(' | ')} |`;
const head = (cells) => `${row(cells)}\n${row(cells.map((c, i) => (i === 0 ? '---' : '---:')))}`;

function machineLine(r) {
  const m = r.machine;
  return `Machine: ${m.nproc} cores, ${m.cpu}, kernel ${m.kernel}, node ${m.node}; load average at start ${m.loadavg} (${m.date}). Command: \`${r.command}\`.`;
}

function nativeLatency(l) {
  const out = [
    `### Hook latency, native (file: disk, loop device)`,
    '',
    `Load average: ${l.loadStart} at start, ${l.loadEnd} at end.`,
    '',
  ];
  const n = l.node.length;
  const diffs = l.ours.add.map((a, i) => a - l.node[i]);
  const cpu = (v) => (v?.length ? [ms(p50(v)), ms(p95(v))] : ['–', '–']);
  out.push(head(['run (n each)', 'wall p50', 'wall p95', 'CPU p50', 'CPU p95']));
  out.push(row([`bare \`node -e 0\` (${n})`, ms(p50(l.node)), ms(p95(l.node)), ...cpu(l.nodeCpu)]));
  out.push(
    row([`ours \`block add\` (${l.ours.add.length})`, ms(p50(l.ours.add)), ms(p95(l.ours.add)), ...cpu(l.ours.addCpu)]),
  );
  out.push(
    row([
      `stock \`block add\` (${l.stock.add.length})`,
      ms(p50(l.stock.add)),
      ms(p95(l.stock.add)),
      ...cpu(l.stock.addCpu),
    ]),
  );
  if (l.served?.add.length)
    out.push(
      row([
        `ours \`block add\`, service up (${l.served.add.length})`,
        ms(p50(l.served.add)),
        ms(p95(l.served.add)),
        ...cpu(l.served.addCpu),
      ]),
    );
  out.push(row([`ours \`block remove\``, ms(p50(l.ours.remove)), ms(p95(l.ours.remove)), ...cpu(l.ours.removeCpu)]));
  if (l.served?.remove.length)
    out.push(
      row([
        `ours \`block remove\`, service up`,
        ms(p50(l.served.remove)),
        ms(p95(l.served.remove)),
        ...cpu(l.served.removeCpu),
      ]),
    );
  out.push(
    row([`stock \`block remove\``, ms(p50(l.stock.remove)), ms(p95(l.stock.remove)), ...cpu(l.stock.removeCpu)]),
  );
  out.push('');
  out.push(head(['ratio / difference', 'value', 'target']));
  out.push(row(['ours add − `node -e 0`, median of per-round differences', ms(p50(diffs)), '≤ 20 ms']));
  out.push(row(['ours add / stock add (p50)', ratio(p50(l.ours.add), p50(l.stock.add)), '–']));
  out.push(row(['ours remove / stock remove (p50)', ratio(p50(l.ours.remove), p50(l.stock.remove)), '–']));
  if (l.served?.add.length) {
    out.push(row(['service up: ours add / stock add (p50)', ratio(p50(l.served.add), p50(l.stock.add)), '≤ 0.5×']));
    out.push(
      row(['service up: ours remove / stock remove (p50)', ratio(p50(l.served.remove), p50(l.stock.remove)), '–']),
    );
  }
  out.push(row(['`node -e 0` / stock add (p50)', ratio(p50(l.node), p50(l.stock.add)), '–']));
  if (l.ours.addCpu?.length && l.nodeCpu?.length) {
    out.push(
      row([
        'CPU: ours add − `node -e 0`, median of per-round differences',
        ms(p50(l.ours.addCpu.map((a, i) => a - l.nodeCpu[i]))),
        '(≤ 20 ms)',
      ]),
    );
    out.push(row(['CPU: ours add / stock add (p50)', ratio(p50(l.ours.addCpu), p50(l.stock.addCpu)), '–']));
    out.push(row(['CPU: ours remove / stock remove (p50)', ratio(p50(l.ours.removeCpu), p50(l.stock.removeCpu)), '–']));
  }
  for (const action of ['add', 'remove']) {
    const b = l.breakdown[action];
    if (!b?.length) continue;
    out.push(
      '',
      `Where our \`block ${action}\` spends its time (medians of ${b.length} probed runs, interleaved with the above; the probe's own small cost is inside these figures):`,
      '',
    );
    out.push(breakdownTable([['ours', b]]));
  }
  return out.join('\n');
}

/** One column per [name, probed runs]; rows are the parts of a hook's time (medians). */
function breakdownTable(cols) {
  const med = (b, k) => p50(b.map((x) => x[k]));
  const names = (b) => [...new Set(b.flatMap((x) => Object.keys(x.cmds)))].join(', ');
  const out = [head(['part', ...cols.map(([n]) => n)])];
  out.push(row(['node start (spawn → bootstrap done)', ...cols.map(([, b]) => ms(med(b, 'nodeStart')))]));
  out.push(
    row(['bundle load, config, logger (→ first xenstore or child)', ...cols.map(([, b]) => ms(med(b, 'load')))]),
  );
  out.push(
    row([
      'xenstore (connect + waiting on replies)',
      ...cols.map(([, b]) => `${ms(med(b, 'xenstore'))} (${med(b, 'xsRequests')} req)`),
    ]),
  );
  out.push(row(['lock (`flock` children, incl. waiting)', ...cols.map(([, b]) => ms(med(b, 'lock')))]));
  out.push(
    row([
      'device commands',
      ...cols.map(([, b]) => `${ms(med(b, 'commands'))} (${med(b, 'commandCount')}: ${names(b)})`),
    ]),
  );
  out.push(row(['other JS (journal, checks, reporting)', ...cols.map(([, b]) => ms(med(b, 'jsOther')))]));
  out.push(row(['exit (last JS → parent sees exit)', ...cols.map(([, b]) => ms(med(b, 'exit')))]));
  out.push(row(['**total** (probed run)', ...cols.map(([, b]) => ms(med(b, 'total')))]));
  return out.join('\n');
}

function nativeConcurrency(c) {
  const out = [
    `### ${c.n} concurrent adds on ${c.n} different files, then ${c.n} concurrent removes (native)`,
    '',
    `Load average: ${c.loadStart} at start, ${c.loadEnd} at end. ${c.ours.length} trials each, ours (service down)${c.served?.length ? ', ours with the service up' : ''} and stock in rotation.`,
    '',
  ];
  out.push(head(['', 'adds wall p50', 'p95', 'slowest single add p50', 'removes wall p50', 'p95', 'failures']));
  for (const k of ['ours', 'served', 'stock']) {
    const t = c[k];
    if (!t?.length) continue;
    out.push(
      row([
        k === 'served' ? 'ours, service up' : k === 'ours' ? 'ours, service down' : k,
        ms(p50(t.map((x) => x.addWall))),
        ms(p95(t.map((x) => x.addWall))),
        ms(p50(t.map((x) => x.maxAdd))),
        ms(p50(t.map((x) => x.removeWall))),
        ms(p95(t.map((x) => x.removeWall))),
        String(t.reduce((s, x) => s + x.addFailures + x.removeFailures, 0)),
      ]),
    );
  }
  out.push('', head(['ratio', 'value', 'target']));
  out.push(
    row([
      'ours / stock, adds wall (p50)',
      ratio(p50(c.ours.map((x) => x.addWall)), p50(c.stock.map((x) => x.addWall))),
      '≤ 0.4×',
    ]),
  );
  out.push(
    row([
      'ours / stock, removes wall (p50)',
      ratio(p50(c.ours.map((x) => x.removeWall)), p50(c.stock.map((x) => x.removeWall))),
      '–',
    ]),
  );
  if (c.served?.length) {
    out.push(
      row([
        'service up: ours / stock, adds wall (p50)',
        ratio(p50(c.served.map((x) => x.addWall)), p50(c.stock.map((x) => x.addWall))),
        '≤ 0.4×',
      ]),
    );
    out.push(
      row([
        'service up: ours / stock, removes wall (p50)',
        ratio(p50(c.served.map((x) => x.removeWall)), p50(c.stock.map((x) => x.removeWall))),
        '–',
      ]),
    );
  }
  return out.join('\n');
}

function nativeScaling(s) {
  const label = { stock: 'stock `block`', ours: 'ours, service down', served: 'ours, service up' };
  const out = [
    `### How an add grows with the disks already present (native, phy: disk on a loop device)`,
    '',
    `N other vbds in xenstore, each with a physical-device. Load average: ${s.loadStart} at start, ${s.loadEnd} at end. ${s.stock[s.counts[0]].add.length} cycles each, interleaved.`,
    '',
  ];
  out.push(head(['add p50', ...s.counts.map((n) => `N = ${n}`), 'slope per 100 vbds']));
  const first = s.counts[0];
  const last = s.counts[s.counts.length - 1];
  const slope = (k) => ((p50(s[k][last].add) - p50(s[k][first].add)) * 100) / (last - first);
  for (const k of ['stock', 'ours', 'served'])
    out.push(row([label[k], ...s.counts.map((n) => ms(p50(s[k][n].add))), ms(slope(k))]));
  out.push('', head(['ratio', 'value', 'target']));
  for (const k of ['ours', 'served'])
    out.push(row([`slope: ${label[k]} / stock`, ratio(slope(k), slope('stock')), k === 'served' ? '≤ 0.1×' : '–']));
  return out.join('\n');
}

function startup(s) {
  const out = [`### Start-up (native)`, '', `Load average: ${s.loadStart} at start, ${s.loadEnd} at end.`, ''];
  const base = s.times['node -e 0'];
  const cbase = s.cpu?.['node -e 0'] ?? [];
  out.push(
    head([
      'command (n each)',
      'wall p50',
      'wall p95',
      'wall − node -e 0 (p50 of per-round)',
      'CPU p50',
      'CPU − node -e 0 (p50 of per-round)',
      'bundle size',
    ]),
  );
  for (const [k, v] of Object.entries(s.times)) {
    const name = (k.startsWith('node ') ? k.split(' ')[1] : k.split(' ')[0]).replace(/\.mjs$/, '');
    const c = s.cpu?.[k] ?? [];
    const isBase = k === 'node -e 0';
    out.push(
      row([
        `\`${k}\` (${v.length})`,
        ms(p50(v)),
        ms(p95(v)),
        isBase ? '–' : ms(p50(v.map((x, i) => x - base[i]))),
        c.length ? ms(p50(c)) : '–',
        isBase || !c.length || !cbase.length ? '–' : ms(p50(c.map((x, i) => x - cbase[i]))),
        s.sizes[name] ? `${(s.sizes[name] / 1024).toFixed(0)} KiB` : '–',
      ]),
    );
  }
  return out.join('\n');
}

function guestLatency(g) {
  const out = ['### Hook latency in the guest (QEMU TCG, one vCPU, real dm/loop/nbd)', ''];
  out.push(
    head([
      'hook (n each)',
      'add p50',
      'add p95',
      'remove p50',
      'remove p95',
      'add / stock add',
      'remove / stock remove',
    ]),
  );
  const s = g.stock;
  for (const k of ['stock', 'cow', 'qcow', 'thin']) {
    if (!g[k]) continue;
    const name = {
      stock: 'stock `block` (file:)',
      cow: '`block-cow` (N, 64K)',
      qcow: '`block-qcow` overlay=transient',
      thin: '`block-thin`',
    }[k];
    out.push(
      row([
        `${name} (${g[k].add.length})`,
        ms(p50(g[k].add)),
        ms(p95(g[k].add)),
        ms(p50(g[k].remove)),
        ms(p95(g[k].remove)),
        ratio(p50(g[k].add), p50(s.add)),
        ratio(p50(g[k].remove), p50(s.remove)),
      ]),
    );
  }
  out.push(
    row([
      `bare \`node -e 0\` (${g.node.length})`,
      ms(p50(g.node)),
      ms(p95(g.node)),
      '',
      '',
      ratio(p50(g.node), p50(s.add)),
      '',
    ]),
  );
  const bd = Object.entries(g.breakdown ?? {});
  for (const action of ['add', 'remove']) {
    if (!bd.length) break;
    out.push(
      '',
      `Where our hooks' \`${action}\` time goes in the guest (medians of ${bd[0][1][action].length} probed runs each, after the timed rounds):`,
      '',
    );
    out.push(breakdownTable(bd.map(([k, b]) => [`block-${k}`, b[action]])));
  }
  return out.join('\n');
}

function guestConcurrency(c) {
  const out = [`### ${c.n} concurrent adds on one base, then ${c.n} concurrent removes (guest)`, ''];
  out.push(
    head([
      '',
      'single add (p50 of 3)',
      `${c.n} adds wall`,
      'wall / single add',
      'slowest add',
      'median add',
      `${c.n} removes wall`,
      'slowest remove',
      'failures',
      'distinct devices',
      'left behind',
    ]),
  );
  for (const k of ['cow', 'stock']) {
    const t = c[k];
    if (!t) continue;
    const single = p50(t.single);
    out.push(
      row([
        k === 'cow' ? '`block-cow` (w)' : 'stock `block` file: (r, same file)',
        ms(single),
        sec(t.addWall),
        ratio(t.addWall, single),
        ms(t.maxAdd),
        ms(t.medianAdd),
        sec(t.removeWall),
        ms(t.maxRemove),
        String(t.addFailures + t.removeFailures),
        String(t.distinctDevices),
        String(t.leftAfter.length),
      ]),
    );
  }
  if (c.cow && c.stock)
    out.push(
      '',
      `block-cow / stock, ${c.n} adds wall: ${ratio(c.cow.addWall, c.stock.addWall)}; removes wall: ${ratio(c.cow.removeWall, c.stock.removeWall)}. Targets: 0 failures; wall within 3× a single add.`,
    );
  return out.join('\n');
}

function datapath(d) {
  const out = [
    `### Data path in the guest (fio: direct=1, psync, iodepth 1; ${d.seconds} s per job, ${d.rounds} rounds in rotated order, medians; ${d.baseMiB} MiB random base on ext4)`,
    '',
  ];
  const metrics = [
    ['seqRead', 'seq read 1M', 'mibs', 'MiB/s'],
    ['firstWrite', '4K first write', 'iops', 'IOPS'],
    ['overwrite', '4K overwrite', 'iops', 'IOPS'],
    ['randRead', '4K rand read', 'iops', 'IOPS'],
  ];
  const med = (label, m, f) => p50((d.results[label] ?? []).map((x) => x[m][f]));
  out.push(head(['device', ...metrics.map(([, t, , u]) => `${t} (${u})`), ...metrics.map(([, t]) => `${t} / raw`)]));
  for (const label of Object.keys(d.results)) {
    out.push(
      row([
        label,
        ...metrics.map(([m, , f]) => med(label, m, f).toFixed(0)),
        ...metrics.map(([m, , f]) => ratio(med(label, m, f), med('raw loop', m, f))),
      ]),
    );
  }
  return out.join('\n');
}

function origin(d) {
  const out = [
    `### Origin writes with N snapshots: classic LVM snapshots (block-lvsnap) vs thin (guest)`,
    '',
    `fio 4 KiB random first writes (each into its own 64 KiB-aligned place) on a ${d.originMiB} MiB origin LV filled with data; ${d.seconds} s per run, ${d.rounds} rounds in rotated order, medians. Classic: \`lvcreate -s -L 16M\` per snapshot, as block-lvsnap does; thin: \`lvcreate -s\` of a thin LV in a 64K-chunk pool.`,
    '',
  ];
  const med = (k) => p50((d.results[k] ?? []).map((x) => x.iops));
  out.push(
    head(['snapshots', 'classic IOPS', 'classic / no snapshot', 'thin IOPS', 'thin / no snapshot', 'thin / classic']),
  );
  for (const n of d.counts) {
    out.push(
      row([
        String(n),
        med(`classic ${n}`).toFixed(0),
        ratio(med(`classic ${n}`), med('classic 0')),
        med(`thin ${n}`).toFixed(0),
        ratio(med(`thin ${n}`), med('thin 0')),
        ratio(med(`thin ${n}`), med(`classic ${n}`)),
      ]),
    );
  }
  return out.join('\n');
}

function space(s) {
  const mib = (b) => `${(b / 1048576).toFixed(2)} MiB`;
  const out = [`### Space: ${s.n} block-cow disks on one base, each writing 1 MiB (guest, ext4)`, ''];
  out.push(
    head([
      'base allocated',
      'stores allocated',
      'total',
      'base + writes',
      'overhead',
      'overhead / (base + writes)',
      'add p50 / p95',
      'remove p50',
    ]),
  );
  out.push(
    row([
      mib(s.baseBytes),
      `${mib(s.storeBytes)} (${s.storeFiles} files)`,
      mib(s.baseBytes + s.storeBytes),
      mib(s.expected),
      mib(s.overheadBytes),
      `${((100 * s.overheadBytes) / s.expected).toFixed(2)} %`,
      `${ms(s.add.p50)} / ${ms(s.add.p95)}`,
      ms(s.remove.p50),
    ]),
  );
  return out.join('\n');
}

function dom0(d) {
  const out = [`### Hook latency and concurrency in a real Xen dom0 (stock \`block\` vs ours, file: disk)`, ''];
  out.push(
    `Debian's Xen 4.17 under QEMU TCG, PV dom0 with 1 vCPU, kernel ${d.kernel}, Debian 12's node ${d.nodeVersion}${d.altNodeVersion ? ` (and, for the rows marked so, this machine's node ${d.altNodeVersion}, NodeSource's build, copied into reach of dom0 and installed the same way under /opt/xbh-alt)` : ''}. Hooks installed by the project's installer (--replace-block; the stock script kept as block.stock) and run directly as libxl runs them, against the real xenstored. dom0 ready after ${sec(d.bootMs)}, ${sec(d.totalMs)} in all; host load average ${d.loadStart} at start, ${d.loadEnd} at end.`,
    '',
  );
  if (d.error) out.push('**The run reported failures:**', '', '```', d.error, '```', '');
  const s = d.samples ?? {};
  const get = (k) => s[k] ?? { wall: [], cpu: [] };
  out.push(head(['run (n each)', 'wall p50', 'wall p95', 'CPU p50']));
  const alt = `node ${d.altNodeVersion ?? '(other)'}`;
  for (const [k, label] of [
    ['node start', 'bare `node -e 0`'],
    ['true start', 'bare `/bin/true` (the same timer around the smallest program)'],
    ['ours add', 'ours `block add`'],
    ['stock add', 'stock `block add`'],
    ['cow add', '`block-cow add`'],
    ['ours remove', 'ours `block remove`'],
    ['stock remove', 'stock `block remove`'],
    ['cow remove', '`block-cow remove`'],
    ['served add', 'ours `block add`, service up'],
    ['served remove', 'ours `block remove`, service up'],
    ['cowsrv add', '`block-cow add`, service up'],
    ['cowsrv remove', '`block-cow remove`, service up'],
    ['nodealt start', `bare \`node -e 0\`, ${alt}`],
    ['oursalt add', `ours \`block add\`, ${alt}`],
    ['oursalt remove', `ours \`block remove\`, ${alt}`],
  ]) {
    if (!s[k]) continue;
    const v = get(k);
    out.push(row([`${label} (${v.wall.length})`, ms(p50(v.wall)), ms(p95(v.wall)), ms(p50(v.cpu))]));
  }
  out.push('');
  const oa = get('ours add').wall,
    sa = get('stock add').wall,
    n = get('node start').wall;
  out.push(head(['ratio', 'value', 'target']));
  out.push(row(['ours add / stock add (p50)', ratio(p50(oa), p50(sa)), '–']));
  if (s['cow add'])
    out.push(row(['block-cow add / stock `block` add (p50)', ratio(p50(get('cow add').wall), p50(sa)), '≤ 0.3×']));
  out.push(
    row(['ours remove / stock remove (p50)', ratio(p50(get('ours remove').wall), p50(get('stock remove').wall)), '–']),
  );
  if (s['served add']) {
    out.push(row(['service up: ours add / stock add (p50)', ratio(p50(get('served add').wall), p50(sa)), '≤ 0.25×']));
    out.push(
      row([
        'service up: ours remove / stock remove (p50)',
        ratio(p50(get('served remove').wall), p50(get('stock remove').wall)),
        '–',
      ]),
    );
  }
  if (s['cowsrv add'])
    out.push(
      row([
        'service up: block-cow add / stock `block` add (p50)',
        ratio(p50(get('cowsrv add').wall), p50(sa)),
        '≤ 0.3×',
      ]),
    );
  out.push(row(['ours add − `node -e 0`, median of per-round differences', ms(p50(oa.map((a, i) => a - n[i]))), '–']));
  out.push(row(['CPU: ours add / stock add (p50)', ratio(p50(get('ours add').cpu), p50(get('stock add').cpu)), '–']));
  if (s['oursalt add']) {
    out.push(row([`ours add, ${alt} / stock add (p50)`, ratio(p50(get('oursalt add').wall), p50(sa)), '–']));
    out.push(row([`\`node -e 0\`, ${alt} / stock add (p50)`, ratio(p50(get('nodealt start').wall), p50(sa)), '–']));
  }
  if (d.concurrent?.length) {
    out.push('', head([`at once (${d.concurrency} unless the name says)`, 'wall', 'failures']));
    for (const c of d.concurrent) out.push(row([`${c.variant} ${c.op}`, ms(c.wallMs), String(c.failures)]));
    const mean = (v, op) => {
      const w = d.concurrent.filter((c) => c.variant === v && c.op === op).map((c) => c.wallMs);
      return w.reduce((a, b) => a + b, 0) / w.length;
    };
    out.push(
      '',
      `${d.concurrency} concurrent adds, ours / stock (mean of the trials): ${ratio(mean('ours', 'add'), mean('stock', 'add'))}; removes: ${ratio(mean('ours', 'remove'), mean('stock', 'remove'))}.`,
    );
    if (d.concurrent.some((c) => c.variant === 'served'))
      out.push(
        `With the service up: adds ${ratio(mean('served', 'add'), mean('stock', 'add'))} (target ≤ 0.3×), removes ${ratio(mean('served', 'remove'), mean('stock', 'remove'))} of stock.`,
      );
    for (const c of d.concurrent.filter((x) => /^cowsrv\d+$/.test(x.variant) && x.op === 'add'))
      out.push(
        `${c.variant.slice(6)} block-cow adds on one base at once, service up, each killed at 40 s as libxl would: ${c.failures} failed (target 0), ${ms(c.wallMs)} for all.`,
      );
    for (const c of d.concurrent.filter((x) => /^stock\d+$/.test(x.variant) && x.op === 'add'))
      out.push(
        `${c.variant.slice(5)} stock file: adds at once (one file each), killed at 40 s the same way: ${c.failures} failed, ${ms(c.wallMs)} for all.`,
      );
    if (d.concurrent.some((c) => c.variant === 'ours-wait'))
      out.push(
        `With a longer lock wait (ours-wait): adds ${ratio(mean('ours-wait', 'add'), mean('stock', 'add'))}, removes ${ratio(mean('ours-wait', 'remove'), mean('stock', 'remove'))} of stock.`,
      );
  }
  const scaled = Object.keys(s).filter((k) => /^\w+@\d+ add$/.test(k));
  if (scaled.length) {
    const counts = [...new Set(scaled.map((k) => Number(/@(\d+) /.exec(k)[1])))].sort((a, b) => a - b);
    const lo = counts[0];
    const hi = counts[counts.length - 1];
    const slope = (v) => ((p50(get(`${v}@${hi} add`).wall) - p50(get(`${v}@${lo} add`).wall)) / (hi - lo)) * 100;
    out.push(
      '',
      `How an add grows with the vbds already present (N other vbds in xenstore, connected, each with a physical-device; ${get(`stock@${lo} add`).wall.length} cycles each):`,
      '',
      head(['add p50', ...counts.map((n) => `N = ${n}`), 'slope per 100 vbds']),
    );
    for (const [v, label] of [
      ['stock', 'stock `block`, phy:'],
      ['served', 'ours `block`, phy:, service up'],
      ['cowsrv', 'block-cow, service up'],
    ]) {
      if (!counts.every((n) => s[`${v}@${n} add`])) continue;
      out.push(row([label, ...counts.map((n) => ms(p50(get(`${v}@${n} add`).wall))), ms(slope(v))]));
    }
    out.push('', head(['ratio', 'value', 'target']));
    for (const [v, label] of [
      ['served', 'slope: ours `block`, service up / stock'],
      ['cowsrv', 'slope: block-cow, service up / stock'],
    ])
      if (s[`${v}@${hi} add`]) out.push(row([label, ratio(slope(v), slope('stock')), '≤ 0.1×']));
  }
  if (d.notes?.length) out.push('', ...d.notes.map((l) => `> ${l}`));
  return out.join('\n');
}

export function render(r) {
  const parts = [`## Run of ${r.machine.date}`, '', machineLine(r), ''];
  const n = r.native ?? {};
  if (n.latency) parts.push(nativeLatency(n.latency), '');
  if (n.concurrency) parts.push(nativeConcurrency(n.concurrency), '');
  if (n.scaling) parts.push(nativeScaling(n.scaling), '');
  if (n.startup) parts.push(startup(n.startup), '');
  const g = r.guest ?? {};
  if (Object.keys(g).length) {
    const boots = g.boots ? g.boots.map((b) => b.join(' + ')).join(' | ') : 'one';
    parts.push(
      `Guest boots (parts per boot, run at the same time): ${boots}; ready after ${[g.bootMs].flat().map(sec).join(', ')}, ${sec(g.totalMs)} in all; host load average ${g.loadStart} at start, ${g.loadEnd} at end.`,
      '',
    );
  }
  for (const [k, f] of [
    ['latency', guestLatency],
    ['concurrency', guestConcurrency],
    ['datapath', datapath],
    ['space', space],
    ['origin', origin],
  ]) {
    if (!g[k]) continue;
    if (g[k].error) parts.push(`### ${k} (guest): failed`, '', '```', g[k].error, '```', '');
    else parts.push(f(g[k]), `\n(guest part took ${sec(g[k].partMs)})`, '');
    if (g[k].leftovers?.length) parts.push(`Left behind after ${k}: ${g[k].leftovers.join('; ')}`, '');
  }
  if (r.dom0) parts.push(dom0(r.dom0), '');
  if (r.wallMs) parts.push(`Whole run: ${sec(r.wallMs)}.`, '');
  return `${parts.join('\n')}\n`;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.stdout.write(render(JSON.parse(readFileSync(process.argv[2], 'utf8'))));
}

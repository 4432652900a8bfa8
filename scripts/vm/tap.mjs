// A small reader for the TAP that node:test prints (4-space indented subtests, YAML diagnostics),
// enough to mirror a guest file's results as host assertions.

const POINT = /^( *)(not ok|ok) \d+(?: - (.*?))?(?: # (SKIP|TODO)\b ?(.*))?$/i;
const SUBTEST = /^( *)# Subtest: (.*)$/;

/**
 * Parses TAP text into test points: { name (parents joined with " > "), ok, skip, todo,
 * directive, diag (YAML text), failureType, depth, hasChildren }.
 */
export function parseTap(text) {
  const lines = text.split('\n');
  const points = [];
  const names = [];
  const childSeen = [];
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const sub = SUBTEST.exec(line);
    if (sub) {
      const depth = Math.floor(sub[1].length / 4);
      names.length = depth;
      names[depth] = sub[2];
      childSeen[depth] = false;
      continue;
    }
    const m = POINT.exec(line);
    if (!m) continue;
    const indent = m[1];
    const depth = Math.floor(indent.length / 4);
    let diag = '';
    if (lines[i + 1] === `${indent}  ---`) {
      const end = lines.indexOf(`${indent}  ...`, i + 2);
      if (end > 0) {
        diag = lines
          .slice(i + 2, end)
          .map((l) => l.slice(indent.length + 2))
          .join('\n');
        i = end;
      }
    }
    const own = (m[3] ?? '').replace(/\\#/g, '#');
    const directive = (m[4] ?? '').toUpperCase();
    const failureType = /^failureType: '?([^'\n]*)'?$/m.exec(diag)?.[1];
    points.push({
      name: [...names.slice(0, depth), own].join(' > '),
      ok: m[2].toLowerCase() === 'ok',
      skip: directive === 'SKIP',
      todo: directive === 'TODO',
      directive: m[5] ?? '',
      diag,
      failureType,
      depth,
      hasChildren: Boolean(childSeen[depth]),
    });
    childSeen[depth] = false;
    if (depth > 0) childSeen[depth - 1] = true;
    names.length = depth;
  }
  return points;
}

/**
 * The points worth one host assertion each: every leaf, and a parent only when it failed on
 * its own (a hook or the parent's body), not merely because a child failed.
 */
export function assertionPoints(points) {
  return points.filter((p) => !p.hasChildren || (!p.ok && p.failureType !== 'subtestsFailed'));
}

/** The first line of a failed point's `error:` field, for a one-line message. */
export function errorSummary(diag) {
  const m = /^error: (?:\|-?\n((?: {2}.*\n?)+)|'?(.*?)'?$)/m.exec(diag);
  if (!m) return '';
  const text = m[1]
    ? m[1]
        .split('\n')
        .map((l) => l.trim())
        .filter(Boolean)
        .join(' ')
    : m[2];
  return text.length > 300 ? `${text.slice(0, 300)}…` : text;
}

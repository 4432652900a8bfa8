/**
 * Command-line options for `xen-blockhooks` commands: `--name value`, `--name=value`, `-x value`,
 * boolean flags, `--` ends options. Unknown options, missing or empty values and numbers outside
 * an option's range are usage errors (exit 2), each naming the option.
 */
import { UsageError } from '../hotplug/errors.js';

export interface OptionSpec {
  /** Long name without dashes. */
  name: string;
  short?: string;
  /** `flag` takes no value. */
  type: 'flag' | 'string' | 'int';
  /** May be given several times (values collected in order). */
  repeat?: boolean;
  /** int: the smallest and the largest value that makes sense; anything else is a usage error naming the option. */
  min?: number;
  max?: number;
  /** int: what the number counts, for the message (`ms`, `seconds`). */
  unit?: string;
}

export interface Parsed {
  options: Record<string, string | number | boolean | (string | number)[]>;
  positional: string[];
}

export function parseOptions(argv: readonly string[], specs: readonly OptionSpec[]): Parsed {
  const options: Parsed['options'] = {};
  const positional: string[] = [];
  const byLong = new Map(specs.map((s) => [s.name, s]));
  const byShort = new Map(specs.filter((s) => s.short).map((s) => [s.short as string, s]));
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    let spec: OptionSpec | undefined;
    let inline: string | undefined;
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      inline = eq < 0 ? undefined : a.slice(eq + 1);
      spec = byLong.get(name);
      if (!spec) throw new UsageError(`unknown option --${name}`);
    } else if (a.startsWith('-') && a.length > 1 && !/^-\d/.test(a)) {
      spec = byShort.get(a.slice(1, 2));
      if (!spec) throw new UsageError(`unknown option ${a}`);
      if (a.length > 2) inline = a.slice(2);
    } else {
      positional.push(a);
      continue;
    }
    let value: string | number | boolean;
    if (spec.type === 'flag') {
      if (inline !== undefined) throw new UsageError(`option --${spec.name} takes no value`);
      value = true;
    } else {
      let v = inline;
      if (v === undefined) {
        if (i + 1 >= argv.length) throw new UsageError(`option --${spec.name} needs a value`);
        v = argv[++i] as string;
      }
      if (spec.type === 'int') {
        if (!/^\d+$/.test(v)) throw new UsageError(`option --${spec.name} needs a whole number, not "${v}"`);
        value = Number(v);
        const unit = (n: number) => (!spec.unit ? '' : ` ${n === 1 && /^\w{3,}s$/.test(spec.unit) ? spec.unit.slice(0, -1) : spec.unit}`);
        if (spec.min !== undefined && value < spec.min) throw new UsageError(`option --${spec.name} must be at least ${spec.min}${unit(spec.min)}, not ${v}`);
        if (spec.max !== undefined && value > spec.max) throw new UsageError(`option --${spec.name} must be at most ${spec.max}${unit(spec.max)}, not ${v}`);
      } else {
        if (v === '') throw new UsageError(`option --${spec.name} needs a value, not an empty string`);
        value = v;
      }
    }
    if (spec.repeat) {
      const list = (options[spec.name] as (string | number)[] | undefined) ?? [];
      list.push(value as string | number);
      options[spec.name] = list;
    } else {
      if (options[spec.name] !== undefined && spec.type !== 'flag') throw new UsageError(`option --${spec.name} given twice`);
      options[spec.name] = value;
    }
  }
  return { options, positional };
}

export function str(p: Parsed, name: string): string | undefined {
  const v = p.options[name];
  return typeof v === 'string' ? v : undefined;
}
export function int(p: Parsed, name: string): number | undefined {
  const v = p.options[name];
  return typeof v === 'number' ? v : undefined;
}
export function flag(p: Parsed, name: string): boolean {
  return p.options[name] === true;
}

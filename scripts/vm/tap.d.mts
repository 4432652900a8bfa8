export interface TapPoint {
  name: string;
  ok: boolean;
  skip: boolean;
  todo: boolean;
  directive: string;
  diag: string;
  failureType?: string;
  depth: number;
  hasChildren: boolean;
}
export function parseTap(text: string): TapPoint[];
export function assertionPoints(points: TapPoint[]): TapPoint[];
export function errorSummary(diag: string): string;

/**
 * What a hook is asked to do, once argv and the environment are read (src/hotplug/request.ts
 * parses them), and the file-safe key of a backend path that the journal and the locks share.
 */
export type Action = 'add' | 'remove';
export type Dialect = 'libxl' | 'xend';

export interface HotplugRequest {
  /** The hook's name as installed, e.g. `block-cow`. */
  script: string;
  action: Action;
  dialect: Dialect;
  /** The backend path exactly as given. */
  xenbusPath: string;
  /** `vbd` (or `vbd3`). */
  xenbusType: string;
  verbose: boolean;
}

/** `backend/vbd/5/51712` → `backend~vbd~5~51712`: one file name per backend path, for records and locks. */
export function backendPathKey(backendPath: string): string {
  return backendPath.replace(/^\//, '').replace(/\//g, '~');
}

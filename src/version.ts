declare const __XEN_BLOCKHOOKS_VERSION__: string | undefined;

/** Injected by scripts/build.mjs from package.json; "development" when run from source. */
export const VERSION: string =
  typeof __XEN_BLOCKHOOKS_VERSION__ === 'string' ? __XEN_BLOCKHOOKS_VERSION__ : 'development';

/**
 * How xl names a domain during a live migration: the receiving domain is NAME--incoming until the
 * migration completes, and the sender is renamed NAME--migratedaway before it is destroyed.
 */
export const INCOMING_SUFFIX = '--incoming';
export const MIGRATED_AWAY_SUFFIX = '--migratedaway';

/** Whether the domain is the receiving side of an xl migration (named NAME--incoming until it completes). */
export function isIncoming(domainName: string | undefined): boolean {
  return domainName !== undefined && domainName.endsWith(INCOMING_SUFFIX) && domainName.length > INCOMING_SUFFIX.length;
}

/** Whether the domain is the sending side of an xl migration that completed (renamed before its destroy). */
export function isMigratedAway(domainName: string | undefined): boolean {
  return domainName !== undefined && domainName.endsWith(MIGRATED_AWAY_SUFFIX);
}

export const CHROOT_PACKAGES: string[];
export function debChroot(opts?: { log?: (m: string) => void }): string;

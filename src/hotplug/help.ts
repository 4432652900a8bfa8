import type { Backend } from '../backends/types.js';

export function helpText(b: Backend): string {
  return `Usage: ${b.script} add|remove        (run by xl/libxl; XENBUS_PATH names the backend)
       ${b.script} create|destroy    (the same, as xend called it)
       ${b.script} --help | --version

${b.summary}

${b.usage}

Environment: XENBUS_PATH (backend/vbd/<domid>/<devid>, relative as libxl passes it),
XENSTORED_PATH (xenstore socket), XEN_BLOCKHOOKS_CONF (default /etc/xen/blockhooks.conf).
Exit status: 0 done, 1 the hotplug failed (hotplug-error says why), 2 bad usage.
Log: /var/log/xen/xen-hotplug.log (log_file in the configuration).`;
}

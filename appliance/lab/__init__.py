"""Virtual labs: boot an application group (several restore points, in order) on an isolated network of its own,
run real checks against each VM from inside that network, report per VM and per check (Veeam's SureBackup and
on-demand sandbox). ``group`` reads definitions, ``network`` builds the isolated segment, ``machine`` runs one
guest, ``checks`` judges it, ``runner`` runs a group, ``service`` is the daemon's side (jobs, TTLs, limits)."""

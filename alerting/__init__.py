"""What to do about findings: policy (alert, block, both, dry-run), budgets,
alert lifecycle (firing, updated, resolved; dedup per episode), block list and
alert sinks (Alertmanager, signed webhooks, Slack).  The composition root
builds it all with :func:`alerting.service.build`."""

"""kairos-plugin-dns: names of the network (members, ledger records) served over DNS; the rest forwarded."""

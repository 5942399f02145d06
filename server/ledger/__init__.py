"""The append-only ledger, the certificates issued from it, and the audits that check both."""

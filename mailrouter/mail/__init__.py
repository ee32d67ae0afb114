"""The mail adapters: IMAP (UIDVALIDITY/UID, IDLE, filing), TLS policy, SMTP sending, and the
parsing of raw bytes into an :class:`~mailrouter.message.Email`."""

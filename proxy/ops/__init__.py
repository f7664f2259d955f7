"""Operations on the main port: what the dashboard reads and does beyond the admin API."""

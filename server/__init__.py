"""kodkod's HTTP server, completion pipeline and command line."""

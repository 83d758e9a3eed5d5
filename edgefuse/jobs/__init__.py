"""The jobs a user runs: export (run + ship), sweep (run + store), verify (run on the user's rows), the GPU check."""

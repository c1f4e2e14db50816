"""Importers: MovieLens (modern and classic layouts), KuaiRand logs, generic column-mapped CSV/Parquet."""

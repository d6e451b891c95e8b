"""The core wing: what every part of the project shares, and the only part of covid_keras
that data_prep imports: the TFRecord schema, image units (HU windows), atomic files and
strict JSON, the commands' shared CLI, provenance. Imports nothing else of covid_keras."""

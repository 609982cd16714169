"""The ground floor both the HTTP face and the jobs stand on: configuration, errors, persistence
(store, job queue, model registry), credentials, label-config schema and conversion, intake,
models, predictions and selection; it imports no other package of this project."""

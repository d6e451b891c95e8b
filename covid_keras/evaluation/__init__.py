"""The evaluation wing: predicting a split, the patient decision (``decision.json``),
metrics with bootstrap CIs, Grad-CAM, the report and its tables. Imports the core, model
and io wings; the training and serving wings build on it."""

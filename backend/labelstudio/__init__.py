"""The Label Studio protocol and client: label configs (LabelInterface), prediction results,
the SDK helpers the loop and the batch job use, and the local Label Studio starter."""

"""DICOM results out (docs/design.md section 12): a scan's results as DICOM objects in its own study
(``sr``, ``pmap``, ``sc``, ``pdf``), written by the report stage, and delivered durably through the
outbox to the configured destinations (DICOM nodes, DICOMweb servers, folders)."""

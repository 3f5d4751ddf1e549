"""DICOM helpers shared by every package: parsing stored objects, DICOM JSON, UIDs, tags.

This is the one place that knows pydicom; indexer, changefeed, archive, deid and dicomweb all import it.
"""

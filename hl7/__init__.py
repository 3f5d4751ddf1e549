"""HL7 v2 over MLLP: ADT and order messages turned into updates and work items (docs/hl7.md)."""

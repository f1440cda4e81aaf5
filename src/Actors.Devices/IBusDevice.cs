namespace ActorVmm.Devices;

/// <summary>
/// A device model as a pure state machine. It sees an offset from the base at which the bus
/// placed it, never an absolute port or address, and an access size of 1, 2, 4 or 8 bytes.
/// Models hold no Akka reference; their actor only checks sizes and delegates.
/// </summary>
public interface IBusDevice
{
    /// <summary>Value of a read. Bytes beyond <paramref name="size"/> are ignored by the caller.</summary>
    ulong Read(ulong offset, int size);

    void Write(ulong offset, int size, ulong value);
}

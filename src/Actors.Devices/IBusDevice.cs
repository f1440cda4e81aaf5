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

/// <summary>The width of a bus access: 1, 2, 4 or 8 bytes (an I/O port access or an MMIO access).</summary>
public static class AccessSize
{
    /// <summary>Whether a bus can make an access of <paramref name="size"/> bytes.</summary>
    public static bool IsValid(int size) => size is 1 or 2 or 4 or 8;

    /// <summary>All ones in the low <paramref name="size"/> bytes (what a read from no device
    /// returns); 0 for a size of 0 or less, all 64 bits for 8 or more.</summary>
    public static ulong AllOnes(int size) => size >= 8 ? ulong.MaxValue : size <= 0 ? 0 : (1UL << (size * 8)) - 1;

    /// <summary><paramref name="value"/> cut to its low <paramref name="size"/> bytes.</summary>
    public static ulong Mask(ulong value, int size) => value & AllOnes(size);
}

/// <summary>
/// A model some of whose accesses belong to another device actor: the PCI host bridge's CONFIG_DATA
/// (0xCFC) while CONFIG_ADDRESS names a function that is an actor of its own. Its actor passes such
/// an access on to that device, with the original sender, so the device answers the vcpu itself
/// (a read's <see cref="DeviceProtocol.ReadResult"/>, a waited write's <see cref="DeviceProtocol.WriteDone"/>).
/// </summary>
public interface IForwardingDevice
{
    /// <summary>Whether the access of <paramref name="size"/> bytes at <paramref name="offset"/> is
    /// device <paramref name="device"/>'s (a sibling actor's name), at <paramref name="deviceOffset"/> there.</summary>
    bool TryForward(ulong offset, int size, out string device, out ulong deviceOffset);
}

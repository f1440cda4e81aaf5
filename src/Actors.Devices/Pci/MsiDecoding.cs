namespace ActorVmm.Devices.Pci;

/// <summary>
/// What an MSI or MSI-X message means on x86: the memory write of <see cref="MsiMessage.Data"/> to
/// <see cref="MsiMessage.Address"/> is an interrupt message to the local APICs (Intel SDM Vol 3A
/// §11.11). Address (§11.11.1): bits 31:20 = 0xFEE, 19:12 destination ID, bit 3 redirection hint,
/// bit 2 destination mode (1: logical); bits 63:32 are 0. Data (§11.11.2): bits 7:0 vector, 10:8
/// delivery mode, bit 14 level (meaningful only for level-triggered messages), bit 15 trigger mode
/// (1: level).
/// </summary>
public static class MsiDecoding
{
    public const ulong AddressBase = 0xFEE0_0000;
    private const ulong AddressBaseMask = 0xFFFF_FFFF_FFF0_0000;
    private const ulong DestinationModeLogical = 0b0100;
    private const uint DataLevelAssert = 1u << 14;
    private const uint DataTriggerLevel = 1u << 15;

    /// <summary>
    /// The APIC message <paramref name="message"/> delivers, or null when its address is not in the
    /// local APICs' 0xFEExxxxx range (on a PC such a write goes to memory, not to an APIC: the
    /// function's message is then lost, which a guest that programs such an address asked for) or its
    /// delivery mode is the reserved encoding 011b (§11.11.2). The
    /// redirection hint is not modelled: lowest-priority delivery is the router's arbitration either way.
    /// </summary>
    public static ApicMessage? ToApicMessage(MsiMessage message)
    {
        if ((message.Address & AddressBaseMask) != AddressBase) return null;
        var mode = (DeliveryMode)((message.Data >> 8) & 0b111);
        if (mode == (DeliveryMode)0b011) return null;
        var levelTriggered = (message.Data & DataTriggerLevel) != 0;
        return new ApicMessage(
            Vector: (byte)message.Data,
            Mode: mode,
            LogicalDestination: (message.Address & DestinationModeLogical) != 0,
            Destination: (uint)(message.Address >> 12) & 0xFF,
            Level: !levelTriggered || (message.Data & DataLevelAssert) != 0, // an edge message is an assert
            LevelTriggered: levelTriggered);
    }
}

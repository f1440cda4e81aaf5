namespace ActorVmm.Devices;

/// <summary>Fixed ports, addresses and GSIs of the ActorVmm PC platform, in one place.</summary>
public static class Platform
{
    public const ushort Com1Port = 0x3F8;
    public const ushort Com1Length = 8;
    public const uint Com1Gsi = 4;

    /// <summary>QEMU isa-debug-exit convention: a write of v ends the VM with status (v &lt;&lt; 1) | 1.</summary>
    public const ushort DebugExitPort = 0xF4;
    public const ushort DebugExitLength = 1;

    public const ushort I8042DataPort = 0x60;
    public const ushort I8042CommandPort = 0x64;
    public const uint KeyboardGsi = 1;

    /// <summary>Guest RAM below 4 GiB ends here at most; the MMIO hole follows up to 4 GiB.</summary>
    public const ulong MmioHoleStart = 0xC000_0000;
    public const ulong MmioHoleEnd = 0x1_0000_0000;
    public const ulong LocalApicBase = 0xFEE0_0000;
    public const ulong IoApicBase = 0xFEC0_0000;
}

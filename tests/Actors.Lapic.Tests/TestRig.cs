using ActorVmm.Devices;
using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic.Tests;

/// <summary>Remembers everything a <see cref="LocalApic"/> sends out.</summary>
internal sealed class RecordingLapicEvents : ILapicEvents
{
    public List<Ipi> Ipis { get; } = [];
    public List<byte> LevelEois { get; } = [];
    public List<(VcpuEventKind Kind, byte Vector)> VcpuEvents { get; } = [];

    public void SendIpi(Ipi ipi) => Ipis.Add(ipi);
    public void LevelEoi(byte vector) => LevelEois.Add(vector);
    public void VcpuEvent(VcpuEventKind kind, byte vector) => VcpuEvents.Add((kind, vector));
}

/// <summary>A local APIC on a manual clock, with register-level helpers (xAPIC MMIO, x2APIC MSRs).</summary>
internal sealed class Rig
{
    /// <summary>10 MHz timer and TSC: one count (divide by 1) or one TSC tick per TimeSpan tick (100 ns).</summary>
    public static readonly LapicOptions TickOptions = new() { TimerFrequencyHz = 10_000_000, TscFrequencyHz = 10_000_000 };

    public RecordingLapicEvents Events { get; } = new();
    public ManualClock Clock { get; } = new();
    public LocalApic Apic { get; }

    /// <summary>The vlapic around <see cref="Apic"/> (no assist): its generic checks, then the model.</summary>
    public Vlapic Vlapic => Vlapic.Emulated(Apic);

    public Rig(uint id = 0, bool bsp = true, LapicOptions? options = null, bool enabled = true)
    {
        Apic = new LocalApic(id, Events, Clock, options ?? TickOptions, bsp);
        if (enabled) Write(Svr, 0x1FF); // software enable, spurious vector 0xFF
    }

    public uint Read(int offset) => (uint)Apic.ReadMmio((ulong)offset, 4);

    public void Write(int offset, uint value) => Apic.WriteMmio((ulong)offset, 4, value);

    /// <summary>Reads ESR the way the SDM asks: write, then read.</summary>
    public ApicError LatchEsr()
    {
        Write(Esr, 0);
        return (ApicError)Read(Esr);
    }

    public bool BitSet(int bitmap, int vector) => (Read(VectorRegister(bitmap, vector)) & (1u << (vector & 31))) != 0;

    public bool InIrr(int vector) => BitSet(Irr, vector);
    public bool InIsr(int vector) => BitSet(Isr, vector);
    public bool InTmr(int vector) => BitSet(Tmr, vector);

    /// <summary>The vcpu takes whatever is pending; returns it.</summary>
    public int? Take()
    {
        var v = Apic.PendingInterrupt();
        if (v is { } vector) Apic.InterruptAccepted((byte)vector);
        return v;
    }

    public ulong ReadMsr(uint msr)
    {
        Assert.True(Apic.ReadMsr(msr, out var value), $"RDMSR 0x{msr:X} faulted");
        return value;
    }

    public void WriteMsr(uint msr, ulong value) => Assert.True(Apic.WriteMsr(msr, value), $"WRMSR 0x{msr:X} faulted");

    /// <summary>xAPIC → x2APIC the legal way.</summary>
    public void EnterX2Apic() =>
        Assert.True(Apic.WriteApicBase(LocalApic.DefaultBaseAddress | LocalApic.BaseEnable | LocalApic.BaseExtd | (Apic.ApicBase & LocalApic.BaseBsp)));
}

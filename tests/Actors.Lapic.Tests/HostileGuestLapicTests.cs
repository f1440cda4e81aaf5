using ActorVmm.Devices;

namespace ActorVmm.Lapic.Tests;

/// <summary>
/// A hostile guest against three local APICs wired to each other: seeded random xAPIC MMIO and
/// x2APIC MSR accesses of every size and offset, IA32_APIC_BASE mode changes, IPIs with any
/// delivery mode, shorthand and destination (routed the way the APIC router matches them),
/// interrupts taken and EOIed, LINT pins toggled, and time going by. The model must never throw,
/// must never offer a vector below 16 (SDM §10.5.2: those are illegal and never delivered), and a
/// snapshot restored must equal the APIC it was taken from. A failure names the seed.
/// </summary>
public sealed class HostileGuestLapicTests
{
    private const int Seeds = 30;
    private const int Steps = 3_000;

    private static readonly ulong[] Interesting = [0, 1, 0xF, 0x10, 0xFF, 0x100, 0x4500, 0x4600, 0xC_4000, 0x8_4000, 0x1_0000,
        0xFFFF_FFFF, 0x1_0000_0000, ulong.MaxValue, LocalApic.DefaultBaseAddress | LocalApic.BaseEnable,
        LocalApic.DefaultBaseAddress | LocalApic.BaseEnable | LocalApic.BaseExtd, LocalApic.DefaultBaseAddress];

    /// <summary>Collects what the APICs send; delivered after each step (the events must not call back in).</summary>
    private sealed class Wires : ILapicEvents
    {
        public readonly Queue<Ipi> Ipis = new();
        public void SendIpi(Ipi ipi) => Ipis.Enqueue(ipi);
        public void LevelEoi(byte vector) { }
        public void VcpuEvent(VcpuEventKind kind, byte vector) { }
    }

    private static ulong Value(Random r) => r.Next(3) == 0 ? Interesting[r.Next(Interesting.Length)] : (ulong)r.NextInt64() ^ ((ulong)r.Next() << 33);

    private static uint Msr(Random r) => r.Next(10) switch
    {
        0 => ApicMsrs.ApicBase,
        1 => ApicMsrs.TscDeadline,
        2 => (uint)r.Next(),
        _ => (uint)(ApicMsrs.X2ApicFirst + r.Next(0x100)),
    };

    private int _routed, _taken;

    private void Route(Ipi ipi, LocalApic[] apics, int from)
    {
        _routed++;
        for (var i = 0; i < apics.Length; i++)
        {
            var to = ipi.Shorthand switch
            {
                Shorthand.Self => i == from,
                Shorthand.AllIncludingSelf => true,
                Shorthand.AllExcludingSelf => i != from,
                _ => ipi.DestinationMode == DestinationMode.Physical ? apics[i].MatchesPhysical(ipi.Destination) : apics[i].MatchesLogical(ipi.Destination),
            };
            if (to) apics[i].Deliver(ipi.Mode, ipi.Vector, ipi.Level, ipi.TriggerMode);
        }
    }

    private void Step(Random r, LocalApic[] apics, Wires[] wires, ManualClock clock)
    {
        var i = r.Next(apics.Length);
        var apic = apics[i];
        switch (r.Next(13))
        {
            case 0 or 1:
                apic.ReadMmio(r.Next(4) == 0 ? (ulong)r.Next(0x1010) : (ulong)(r.Next(0x100) << 4), r.Next(4) == 0 ? r.Next(0, 9) : 4);
                break;
            case 2 or 3:
                apic.WriteMmio(r.Next(4) == 0 ? (ulong)r.Next(0x1010) : (ulong)(r.Next(0x40) << 4), r.Next(4) == 0 ? r.Next(0, 9) : 4, Value(r));
                break;
            case 4:
                apic.ReadMsr(Msr(r), out _);
                break;
            case 5 or 6:
                apic.WriteMsr(Msr(r), Value(r));
                break;
            case 7:
                // Mostly the legal modes (a guest moving between them), sometimes anything.
                ulong[] modes = [LocalApic.DefaultBaseAddress, LocalApic.DefaultBaseAddress | LocalApic.BaseEnable,
                    LocalApic.DefaultBaseAddress | LocalApic.BaseEnable | LocalApic.BaseExtd];
                apic.WriteApicBase(r.Next(4) == 0 ? Value(r) : modes[r.Next(10) == 0 ? 0 : 1 + r.Next(2)]);
                if (apic.Mode == ApicMode.Disabled && r.Next(2) == 0) apic.WriteApicBase(modes[1]);
                break;
            case 12:
                // A well-formed IPI from the guest: software-enable the APIC, lower TPR, write the ICR.
                var icr = (ulong)(r.Next(8) == 0 ? r.Next(256) : r.Next(16, 256)) | ((ulong)r.Next(8) << 8) | ((ulong)r.Next(2) << 11)
                    | ((ulong)r.Next(2) << 14) | ((ulong)r.Next(2) << 15) | ((ulong)r.Next(4) << 18);
                var destination = r.Next(3) == 0 ? (uint)r.Next() : (uint)r.Next(4) | (r.Next(2) == 0 ? 0 : 1u << r.Next(8));
                if (apic.Mode == ApicMode.XApic)
                {
                    apic.WriteMmio(ApicOffsets.Svr, 4, 0x1FF);
                    apic.WriteMmio(ApicOffsets.Tpr, 4, 0);
                    apic.WriteMmio(ApicOffsets.IcrHigh, 4, (ulong)(destination & 0xFF) << 24);
                    apic.WriteMmio(ApicOffsets.IcrLow, 4, icr);
                }
                else if (apic.Mode == ApicMode.X2Apic)
                {
                    apic.WriteMsr(ApicMsrs.X2ApicFirst + (ApicOffsets.Svr >> 4), 0x1FF);
                    apic.WriteMsr(ApicMsrs.X2ApicFirst + (ApicOffsets.Tpr >> 4), 0);
                    apic.WriteMsr(ApicMsrs.X2ApicIcr, icr | ((ulong)destination << 32));
                }
                break;
            case 8:
                apic.Deliver((DeliveryMode)r.Next(8), (byte)r.Next(256), r.Next(4) != 0, (TriggerMode)r.Next(2));
                break;
            case 9:
                if (apic.PendingInterrupt() is { } vector)
                {
                    Assert.True(vector >= 16, $"vector {vector} offered");
                    apic.InterruptAccepted((byte)vector);
                    _taken++;
                }
                if (r.Next(2) == 0) apic.EndOfInterrupt();
                break;
            case 10:
                var pin = r.Next(2) == 0 ? apic.Lint0 : apic.Lint1;
                switch (r.Next(3))
                {
                    case 0: pin.Assert(); break;
                    case 1: pin.Deassert(); break;
                    default: pin.Pulse(); break;
                }
                break;
            default:
                clock.Advance(TimeSpan.FromTicks(r.Next(3) == 0 ? r.NextInt64(TimeSpan.TicksPerSecond) : r.Next(5_000)));
                foreach (var a in apics) a.OnDeadline();
                break;
        }
        // What the APICs sent reaches the others now (IPIs can cause more IPIs only by guest writes).
        for (var from = 0; from < apics.Length; from++)
            while (wires[from].Ipis.TryDequeue(out var ipi))
                Route(ipi, apics, from);
        foreach (var a in apics)
            if (a.PendingInterrupt() is { } v) Assert.True(v >= 16, $"vector {v} offered");
    }

    [Fact]
    public void Local_apics_take_random_guest_accesses_and_ipis_without_throwing_and_snapshot_faithfully()
    {
        var failures = new List<string>();
        for (var seed = 0; seed < Seeds; seed++)
        {
            var r = new Random(seed);
            var clock = new ManualClock();
            var wires = new[] { new Wires(), new Wires(), new Wires() };
            var apics = wires.Select((w, id) => new LocalApic((uint)id, w, clock, Rig.TickOptions, bsp: id == 0)).ToArray();
            var step = 0;
            try
            {
                for (; step < Steps; step++)
                {
                    Step(r, apics, wires, clock);
                    if (step % 500 != 499) continue;
                    foreach (var apic in apics)
                    {
                        var state = apic.State();
                        Assert.Equal(state, LocalApic.FromState(state, new Wires(), clock, Rig.TickOptions).State());
                    }
                }
            }
            catch (Exception e)
            {
                failures.Add($"seed {seed}, step {step}: {e.GetType().Name}: {e.Message}");
            }
        }
        Assert.True(failures.Count == 0, $"{failures.Count} of {Seeds} runs failed: {string.Join("; ", failures.Take(6))}");
        // The guest got somewhere: IPIs went out and interrupts were taken.
        Assert.True(_routed > Seeds * 20 && _taken > Seeds * 10, $"{_routed} IPIs routed, {_taken} interrupts taken");
    }
}

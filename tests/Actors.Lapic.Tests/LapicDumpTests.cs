using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic.Tests;

/// <summary>The `ctl regs` text of a local APIC reflects the state the guest left it in.</summary>
public sealed class LapicDumpTests
{
    [Fact]
    public void Dump_shows_mode_priorities_pending_and_in_service_vectors_lvts_and_timer()
    {
        var rig = new Rig(id: 3);
        rig.Write(Tpr, 0x20);
        rig.Apic.Accept(0x41, level: true, TriggerMode.Level);
        Assert.Equal(0x41, rig.Take()); // 0x41 in service, level: in TMR
        rig.Apic.Accept(0x33, level: true, TriggerMode.Edge); // below the in-service class: stays in IRR
        rig.Write(LvtTimer, (1u << 17) | 0xEC); // periodic, unmasked, vector 0xEC
        rig.Write(TimerDivide, 0b1011); // divide by 1
        rig.Write(TimerInitialCount, 1000);
        rig.Clock.Advance(TimeSpan.FromTicks(250));

        var text = LapicDump.Format(1, rig.Apic.State());

        Assert.Contains("local APIC of vcpu 1: XApic, id 3, software-enabled", text);
        Assert.Contains("(BSP)", text);
        Assert.Contains("TPR=20 PPR=40", text);
        Assert.Contains("IRR: 33\n", text.ReplaceLineEndings("\n"));
        Assert.Contains("ISR: 41\n", text.ReplaceLineEndings("\n"));
        Assert.Contains("TMR: 41\n", text.ReplaceLineEndings("\n"));
        Assert.Contains("LVT timer   000200EC unmasked, Periodic, vector EC", text);
        Assert.Contains("LVT LINT0   00010000 masked, Fixed, vector 00", text);
        Assert.Contains("initial count 1000, current count 750, divide by 1, counting", text);
    }

    [Fact]
    public void Dump_of_a_disabled_apic_after_eoi_shows_no_vectors()
    {
        var rig = new Rig(id: 0, bsp: false, enabled: false);
        var text = LapicDump.Format(0, rig.Apic.State()).ReplaceLineEndings("\n");
        Assert.Contains("id 0, software-disabled", text);
        Assert.DoesNotContain("(BSP)", text);
        Assert.Contains("IRR: none\n  ISR: none\n  TMR: none\n", text);
        Assert.Contains("timer: initial count 0, current count 0, divide by 2, idle", text);
    }
}

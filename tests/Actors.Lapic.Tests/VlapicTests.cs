using ActorVmm.Devices;

namespace ActorVmm.Lapic.Tests;

/// <summary>The vlapic's own part: the checks it makes once, then the assist's hook or the model.</summary>
public sealed class VlapicTests
{
    /// <summary>An assist that records its hooks' calls.</summary>
    private sealed class RecordingAssist(uint apicId) : ILapicAssist
    {
        public List<(DeliveryMode Mode, byte Vector, bool Level, TriggerMode Trigger)> Posted { get; } = [];
        public RecordingInterruptLine Lint0 { get; } = new();
        public RecordingInterruptLine Lint1 { get; } = new();

        public uint ApicId => apicId;

        public void SetIntrReady(DeliveryMode mode, byte vector, bool level, TriggerMode trigger) =>
            Posted.Add((mode, vector, level, trigger));

        public IInterruptLine Lint(int pin) => pin == 0 ? Lint0 : Lint1;
    }

    [Theory]
    [InlineData(DeliveryMode.Fixed)]
    [InlineData(DeliveryMode.LowestPriority)]
    [InlineData(DeliveryMode.Init)]
    public void A_level_triggered_deassert_reaches_neither_the_assist_nor_the_model(DeliveryMode mode)
    {
        var assist = new RecordingAssist(2);
        Vlapic.Assisted(assist, new RecordingLapicEvents()).Deliver(mode, 0x40, level: false, TriggerMode.Level);
        Assert.Empty(assist.Posted);

        var rig = new Rig();
        rig.Write(ApicOffsets.Tpr, 0x20);
        rig.Vlapic.Deliver(mode, 0x40, level: false, TriggerMode.Level);
        Assert.False(rig.InIrr(0x40));
        Assert.Equal(0x20u, rig.Read(ApicOffsets.Tpr)); // no INIT reset either
    }

    [Fact]
    public void A_reserved_delivery_mode_is_dropped_before_the_assist()
    {
        var assist = new RecordingAssist(0);
        Vlapic.Assisted(assist, new RecordingLapicEvents()).Deliver((DeliveryMode)0b011, 0x40, level: true, TriggerMode.Edge);
        Assert.Empty(assist.Posted);
    }

    [Fact]
    public void A_legal_message_goes_to_the_assist_as_it_came()
    {
        var assist = new RecordingAssist(0);
        var vlapic = Vlapic.Assisted(assist, new RecordingLapicEvents());
        vlapic.Deliver(DeliveryMode.Fixed, 0x41, level: true, TriggerMode.Level);
        vlapic.Deliver(DeliveryMode.Nmi, 0, level: false, TriggerMode.Edge);
        Assert.Equal([(DeliveryMode.Fixed, (byte)0x41, true, TriggerMode.Level), (DeliveryMode.Nmi, (byte)0, false, TriggerMode.Edge)],
            assist.Posted);
    }

    [Theory]
    [InlineData(DestinationMode.Physical, 3u, true)]
    [InlineData(DestinationMode.Physical, 0xFFu, true)]
    [InlineData(DestinationMode.Physical, 0xFFFF_FFFFu, true)]
    [InlineData(DestinationMode.Physical, 4u, false)]
    [InlineData(DestinationMode.Logical, 0x10u, true)] // the kernel matches LDR/DFR itself
    public void With_an_assist_a_destination_matches_by_id_or_broadcast(DestinationMode mode, uint destination, bool matches) =>
        Assert.Equal(matches, Vlapic.Assisted(new RecordingAssist(3), new RecordingLapicEvents()).Matches(mode, destination));

    [Fact]
    public void With_an_assist_the_registers_are_not_here()
    {
        var events = new RecordingLapicEvents();
        var assist = new RecordingAssist(0);
        var vlapic = Vlapic.Assisted(assist, events);

        Assert.Equal(LapicBackendKind.KvmAssisted, vlapic.Kind);
        Assert.Equal(0UL, vlapic.ReadMmio(ApicOffsets.Id, 4));
        Assert.False(vlapic.ReadMsr(ApicMsrs.ApicBase, out _));
        Assert.False(vlapic.WriteMsr(ApicMsrs.X2ApicFirst + 8, 0));
        Assert.Null(vlapic.PendingInterrupt());
        Assert.Null(vlapic.NextDeadline);
        Assert.Null(vlapic.TaskPriority);
        Assert.Null(vlapic.ApicBase);
        Assert.True(vlapic.AcceptsInterrupts);
        Assert.Throws<InvalidOperationException>(() => vlapic.State());

        vlapic.Eoi(0x41); // the kernel's EOI exit of a level-triggered vector
        Assert.Equal([(byte)0x41], events.LevelEois);

        vlapic.Lint(0)!.Assert();
        Assert.True(assist.Lint0.Level);
        Assert.Null(vlapic.Lint(2));
    }

    [Fact]
    public void Without_an_assist_an_eoi_report_retires_only_the_vector_in_service()
    {
        var rig = new Rig();
        rig.Apic.Accept(0x50, level: true, TriggerMode.Edge);
        Assert.Equal(0x50, rig.Take());
        rig.Vlapic.Eoi(0x51); // stale: another vector
        Assert.True(rig.InIsr(0x50));
        rig.Vlapic.Eoi(0x50);
        Assert.False(rig.InIsr(0x50));
    }
}

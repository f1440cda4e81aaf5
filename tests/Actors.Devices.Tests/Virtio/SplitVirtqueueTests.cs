using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

public sealed class SplitVirtqueueTests
{
    private const ushort Size = 8;
    private const ulong Data = 0x4_0000;

    private readonly TestGuestMemory _m = new();
    private readonly DriverRing _d;

    public SplitVirtqueueTests() => _d = new DriverRing(_m, Size);

    private SplitVirtqueue Enable(ulong features = VirtioFeatures.IndirectDesc, DriverRing? ring = null)
    {
        var r = ring ?? _d;
        return SplitVirtqueue.Enable(new GuestRam(_m), r.Size, new GuestPhysAddr(r.Desc), new GuestPhysAddr(r.Avail),
            new GuestPhysAddr(r.Used), features);
    }

    private static GuestBuffer Buf(ulong a, uint len) => new(new GuestPhysAddr(a), len);

    /// <summary>The model broke with <paramref name="error"/>, took nothing, and touched nothing outside RAM.</summary>
    private void AssertBroken(SplitVirtqueue q, VirtqueueError error)
    {
        Assert.False(q.TryPop(out _));
        Assert.Equal(error, q.Error);
        Assert.Equal(0, q.LastAvailIdx);
        Assert.False(q.Push(0, 0));
        Assert.Equal(0, _d.UsedIdx);
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
    }

    [Fact]
    public void Empty_queue_pops_nothing()
    {
        var q = Enable();

        Assert.False(q.TryPop(out _));
        Assert.Null(q.Error);
        Assert.False(q.HasAvailable);
    }

    [Fact]
    public void Direct_chain_pops_into_readable_then_writable_buffers()
    {
        _d.SetDesc(3, Data, 16, DescNext, 5);
        _d.SetDesc(5, Data + 0x100, 32, DescNext, 1);
        _d.SetDesc(1, Data + 0x200, 64, DescWrite);
        _d.MakeAvailable(3);
        var q = Enable();

        Assert.True(q.HasAvailable);
        Assert.True(q.TryPop(out var chain));

        Assert.Equal(3, chain.Head);
        Assert.Equal([Buf(Data, 16), Buf(Data + 0x100, 32)], chain.Readable);
        Assert.Equal([Buf(Data + 0x200, 64)], chain.Writable);
        Assert.Equal(1, q.LastAvailIdx);
        Assert.False(q.TryPop(out _));
    }

    [Fact]
    public void Direct_descriptors_followed_by_an_indirect_table_pop_as_one_chain()
    {
        // §2.7.5.3.2: zero or more direct descriptors, then one indirect descriptor.
        const ulong table = 0x5_0000;
        _d.SetDescAt(table, 0, Data + 0x100, 8, DescNext, 2);
        _d.SetDescAt(table, 2, Data + 0x200, 100, DescWrite | DescNext, 1);
        _d.SetDescAt(table, 1, Data + 0x300, 4, DescWrite);
        _d.SetDesc(0, Data, 12, DescNext, 7);
        _d.SetDesc(7, table, 3 * 16, DescIndirect | DescWrite); // the write flag of a table is ignored
        _d.MakeAvailable(0);
        var q = Enable();

        Assert.True(q.TryPop(out var chain));

        Assert.Equal(0, chain.Head);
        Assert.Equal([Buf(Data, 12), Buf(Data + 0x100, 8)], chain.Readable);
        Assert.Equal([Buf(Data + 0x200, 100), Buf(Data + 0x300, 4)], chain.Writable);
        Assert.Equal(104UL, chain.WritableLength);
    }

    [Fact]
    public void Push_writes_the_used_element_then_the_used_index()
    {
        _d.SetDesc(2, Data, 64, DescWrite);
        _d.MakeAvailable(2);
        var q = Enable();
        Assert.True(q.TryPop(out var chain));

        Assert.True(q.Push(chain.Head, 40));

        Assert.Equal(1, _d.UsedIdx);
        Assert.Equal((2u, 40u), _d.UsedElem(0));
    }

    [Fact]
    public void Pushing_several_chains_writes_their_elements_in_order_across_the_ring_end_and_moves_the_index_once()
    {
        // Resumed at used index 6 of an 8-entry ring: three elements land in slots 6, 7 and 0.
        _m.SetU16(_d.Used + 2, 6);
        _d.SetAvailIdx(6);
        var q = SplitVirtqueue.FromState(new GuestRam(_m), new VirtqueueState(Size, true, _d.Desc, _d.Avail, _d.Used, 6, 6, null), 0);

        Assert.True(q.Push([(4, 64), (1, 64), (7, 10)]));

        Assert.Equal(9, _d.UsedIdx);
        Assert.Equal(9, q.UsedIdx);
        Assert.Equal([(4u, 64u), (1u, 64u), (7u, 10u)], [_d.UsedElem(6), _d.UsedElem(7), _d.UsedElem(8)]);
    }

    [Fact]
    public void Indices_wrap_around_the_ring_and_at_65536()
    {
        // A queue resumed at avail/used index 65533: the free-running 16-bit indices wrap (§2.7.6, §2.7.8).
        _m.SetU16(_d.Used + 2, 65533);
        _d.SetAvailIdx(65533);
        var q = SplitVirtqueue.FromState(new GuestRam(_m),
            new VirtqueueState(Size, true, _d.Desc, _d.Avail, _d.Used, 65533, 65533, null), 0);
        for (var i = 0; i < 3 * Size; i++)
        {
            var head = (ushort)(i % Size);
            _d.SetDesc(head, Data + 0x100UL * head, 8, DescWrite);
            _d.MakeAvailable(head);
            Assert.True(q.TryPop(out var chain));
            Assert.Equal(head, chain.Head);
            Assert.True(q.Push(chain.Head, (uint)i));
            Assert.Equal(((uint)head, (uint)i), _d.UsedElem((65533 + i) % Size));
        }

        Assert.Equal(unchecked((ushort)(65533 + 3 * Size)), _d.UsedIdx);
        Assert.Null(q.Error);
    }

    [Fact]
    public void Readable_buffer_in_firmware_is_accepted_but_a_writable_one_is_not()
    {
        _d.SetDesc(0, TestGuestMemory.RomBase, 16);
        _d.MakeAvailable(0);
        var q = Enable();
        Assert.True(q.TryPop(out var chain));
        Assert.Equal([Buf(TestGuestMemory.RomBase, 16)], chain.Readable);

        _d.SetDesc(1, TestGuestMemory.RomBase, 16, DescWrite);
        _d.MakeAvailable(1);

        Assert.False(q.TryPop(out _));
        Assert.Equal(VirtqueueError.BufferOutsideRam, q.Error);
        Assert.Equal(0, _m.RomWrites);
    }

    [Theory]
    [InlineData(0x1000_0000UL, 16u, (ushort)0)] // in no segment
    [InlineData(TestGuestMemory.RamSize - 8, 16u, DescWrite)] // writable, runs from RAM into firmware
    [InlineData(TestGuestMemory.RomBase + TestGuestMemory.RomSize - 8, 16u, (ushort)0)] // runs past the end
    [InlineData(0xFFFF_FFFF_FFFF_FFF0UL, 0x20u, DescWrite)] // address + length wraps past 2^64
    [InlineData(0x1000UL, 0xFFFF_FFFFu, (ushort)0)] // 4 GiB in a 1 MiB guest
    public void Buffer_outside_guest_ram_breaks_the_queue(ulong addr, uint len, ushort flags)
    {
        _d.SetDesc(0, addr, len, flags);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.BufferOutsideRam);
    }

    [Fact]
    public void Looping_chain_breaks_the_queue_after_queue_size_descriptors()
    {
        _d.SetDesc(0, Data, 8, DescNext, 1);
        _d.SetDesc(1, Data, 8, DescNext, 0);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.ChainTooLong);
    }

    [Fact]
    public void Chain_of_exactly_queue_size_descriptors_is_accepted()
    {
        for (var i = 0; i < Size; i++)
            _d.SetDesc(i, Data + 0x10UL * (ulong)i, 8, i + 1 < Size ? DescNext : (ushort)0, (ushort)(i + 1));
        _d.MakeAvailable(0);
        var q = Enable();

        Assert.True(q.TryPop(out var chain));
        Assert.Equal(Size, chain.Readable.Count);
    }

    [Fact]
    public void Next_index_beyond_the_table_breaks_the_queue()
    {
        _d.SetDesc(0, Data, 8, DescNext, Size);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.DescriptorIndexOutOfRange);
    }

    [Fact]
    public void Head_index_beyond_the_table_breaks_the_queue()
    {
        _d.MakeAvailable(Size);

        AssertBroken(Enable(), VirtqueueError.DescriptorIndexOutOfRange);
    }

    [Fact]
    public void Readable_descriptor_after_a_writable_one_breaks_the_queue()
    {
        _d.SetDesc(0, Data, 8, DescWrite | DescNext, 1);
        _d.SetDesc(1, Data + 0x100, 8);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.ReadableAfterWritable);
    }

    [Fact]
    public void Available_index_more_than_queue_size_ahead_breaks_the_queue()
    {
        _d.SetDesc(0, Data, 8);
        _d.SetAvailIdx(Size + 1);

        AssertBroken(Enable(), VirtqueueError.AvailIndexJump);
    }

    [Fact]
    public void Available_index_exactly_queue_size_ahead_is_accepted()
    {
        for (var i = 0; i < Size; i++)
        {
            _d.SetDesc(i, Data, 8);
            _d.MakeAvailable((ushort)i);
        }
        var q = Enable();

        for (var i = 0; i < Size; i++) Assert.True(q.TryPop(out _));
        Assert.False(q.TryPop(out _));
        Assert.Null(q.Error);
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(24u)]
    [InlineData(15u)]
    public void Indirect_table_whose_length_is_not_a_positive_multiple_of_16_breaks_the_queue(uint len)
    {
        _d.SetDesc(0, 0x5_0000, len, DescIndirect);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.IndirectTableSize);
    }

    [Fact]
    public void Nested_indirect_table_breaks_the_queue()
    {
        _d.SetDescAt(0x5_0000, 0, 0x6_0000, 16, DescIndirect);
        _d.SetDescAt(0x6_0000, 0, Data, 8);
        _d.SetDesc(0, 0x5_0000, 16, DescIndirect);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.NestedIndirect);
    }

    [Fact]
    public void Indirect_descriptor_with_next_breaks_the_queue()
    {
        _d.SetDescAt(0x5_0000, 0, Data, 8);
        _d.SetDesc(0, 0x5_0000, 16, DescIndirect | DescNext, 1);
        _d.SetDesc(1, Data, 8);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.IndirectWithNext);
    }

    [Fact]
    public void Indirect_descriptor_without_the_feature_breaks_the_queue()
    {
        _d.SetDescAt(0x5_0000, 0, Data, 8);
        _d.SetDesc(0, 0x5_0000, 16, DescIndirect);
        _d.MakeAvailable(0);

        AssertBroken(Enable(features: 0), VirtqueueError.IndirectNotNegotiated);
    }

    [Fact]
    public void Indirect_table_outside_guest_ram_breaks_the_queue()
    {
        _d.SetDesc(0, TestGuestMemory.RomBase + TestGuestMemory.RomSize - 16, 32, DescIndirect);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.BufferOutsideRam);
    }

    [Fact]
    public void Loop_inside_an_indirect_table_breaks_the_queue()
    {
        _d.SetDescAt(0x5_0000, 0, Data, 8, DescNext, 1);
        _d.SetDescAt(0x5_0000, 1, Data, 8, DescNext, 0);
        _d.SetDesc(0, 0x5_0000, 32, DescIndirect);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.ChainTooLong);
    }

    [Fact]
    public void Next_beyond_the_indirect_table_breaks_the_queue()
    {
        _d.SetDescAt(0x5_0000, 0, Data, 8, DescNext, 2); // the table has 2 entries
        _d.SetDesc(0, 0x5_0000, 32, DescIndirect);
        _d.MakeAvailable(0);

        AssertBroken(Enable(), VirtqueueError.DescriptorIndexOutOfRange);
    }

    [Fact]
    public void Chain_longer_than_4_GiB_in_total_breaks_the_queue()
    {
        // §2.7.5.2: no chain above 2^32 bytes. 4097 descriptors of 1 MiB (the same RAM each time).
        var big = new DriverRing(_m, 8192, desc: 0x8_0000, avail: 0x2_0000, used: 0x3_0000);
        for (var i = 0; i <= 4096; i++) big.SetDesc(i, 0, 1 << 20, DescNext, (ushort)(i + 1));
        big.SetDesc(4097, 0, 1);
        big.MakeAvailable(0);
        var q = Enable(ring: big);

        Assert.False(q.TryPop(out _));
        Assert.Equal(VirtqueueError.ChainTooLarge, q.Error);
    }

    [Theory]
    [InlineData((ushort)0)]
    [InlineData((ushort)3)]
    [InlineData((ushort)100)]
    public void Queue_size_that_is_not_a_power_of_two_breaks_the_queue(ushort size)
    {
        var q = SplitVirtqueue.Enable(new GuestRam(_m), size, new(_d.Desc), new(_d.Avail), new(_d.Used), 0);

        Assert.Equal(VirtqueueError.InvalidQueueSize, q.Error);
        Assert.False(q.TryPop(out _));
    }

    [Theory]
    [InlineData(DriverRing.DefaultDesc + 8, DriverRing.DefaultAvail, DriverRing.DefaultUsed)] // desc not 16-aligned
    [InlineData(DriverRing.DefaultDesc, DriverRing.DefaultAvail + 1, DriverRing.DefaultUsed)] // avail not 2-aligned
    [InlineData(DriverRing.DefaultDesc, DriverRing.DefaultAvail, DriverRing.DefaultUsed + 2)] // used not 4-aligned
    [InlineData(0x1000_0000UL, DriverRing.DefaultAvail, DriverRing.DefaultUsed)] // desc table in no segment
    [InlineData(DriverRing.DefaultDesc, DriverRing.DefaultAvail, TestGuestMemory.RomBase)] // used ring in firmware
    [InlineData(DriverRing.DefaultDesc, DriverRing.DefaultAvail, TestGuestMemory.RamSize - 32)] // used ring runs out of RAM
    public void Rings_misaligned_or_outside_guest_ram_break_the_queue(ulong desc, ulong avail, ulong used)
    {
        var q = SplitVirtqueue.Enable(new GuestRam(_m), Size, new(desc), new(avail), new(used), 0);

        Assert.Equal(VirtqueueError.RingOutsideRam, q.Error);
        Assert.Equal(0, _m.AccessesOutside);
    }

    [Fact]
    public void Error_is_sticky_and_the_queue_takes_nothing_more()
    {
        _d.SetDesc(0, 0x1000_0000, 8);
        _d.SetDesc(1, Data, 8);
        _d.MakeAvailable(0);
        _d.MakeAvailable(1);
        var q = Enable();
        Assert.False(q.TryPop(out _));

        _d.SetDesc(0, Data, 8); // the driver repairs the descriptor: too late, the device needs a reset

        Assert.False(q.TryPop(out _));
        Assert.Equal(VirtqueueError.BufferOutsideRam, q.Error);
        Assert.False(q.NeedsInterrupt());
        Assert.False(q.EnableNotifications());
    }

    [Fact]
    public void Without_event_index_the_device_interrupts_unless_the_driver_set_no_interrupt()
    {
        // §2.7.7.2: without VIRTIO_F_EVENT_IDX, avail.flags bit 0 suppresses used-buffer notifications.
        var q = Enable(features: 0);
        Assert.False(q.NeedsInterrupt()); // nothing pushed yet

        PopAndPush(q, 0);
        Assert.True(q.NeedsInterrupt());
        Assert.False(q.NeedsInterrupt()); // nothing new since

        _d.AvailFlags = AvailNoInterrupt;
        PopAndPush(q, 1);
        Assert.False(q.NeedsInterrupt());
    }

    [Fact]
    public void With_event_index_the_device_interrupts_when_used_idx_passes_used_event()
    {
        // §2.7.7.2: interrupt when (u16)(new_idx - used_event - 1) < (u16)(new_idx - old_idx).
        var q = Enable(features: VirtioFeatures.EventIdx);
        _d.UsedEvent = 2; // "interrupt me once the entry at used index 2 is written"

        PopAndPush(q, 0);
        Assert.False(q.NeedsInterrupt()); // used.idx 1
        PopAndPush(q, 1);
        Assert.False(q.NeedsInterrupt()); // used.idx 2
        PopAndPush(q, 2);
        Assert.True(q.NeedsInterrupt()); // used.idx 3: entry 2 is there
        PopAndPush(q, 3);
        Assert.False(q.NeedsInterrupt()); // used_event was not moved on

        _d.AvailFlags = AvailNoInterrupt; // ignored with EVENT_IDX
        _d.UsedEvent = 4;
        PopAndPush(q, 4);
        PopAndPush(q, 5);
        Assert.True(q.NeedsInterrupt()); // a batch that crosses used_event interrupts once
    }

    [Fact]
    public void Without_event_index_notifications_are_asked_for_with_used_flags()
    {
        // §2.7.10: VIRTQ_USED_F_NO_NOTIFY in used.flags.
        var q = Enable(features: 0);

        q.DisableNotifications();
        Assert.Equal(UsedNoNotify, _d.UsedFlags);
        Assert.False(q.EnableNotifications());
        Assert.Equal(0, _d.UsedFlags);
    }

    [Fact]
    public void With_event_index_notifications_are_asked_for_with_avail_event()
    {
        // §2.7.10: the device writes the avail index it wants to be notified at into avail_event.
        var q = Enable(features: VirtioFeatures.EventIdx);
        PopAndPush(q, 0);
        PopAndPush(q, 1);

        q.DisableNotifications();
        Assert.Equal(0, _d.UsedFlags);
        Assert.False(q.EnableNotifications());
        Assert.Equal(2, _d.AvailEvent);
    }

    [Fact]
    public void Enabling_notifications_reports_a_chain_made_available_meanwhile()
    {
        var q = Enable(features: VirtioFeatures.EventIdx);
        q.DisableNotifications();
        _d.SetDesc(0, Data, 8);
        _d.MakeAvailable(0);

        Assert.True(q.EnableNotifications());
    }

    [Fact]
    public void Restart_between_pop_and_push_takes_the_chain_again_and_completes_it_once()
    {
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.SetDesc(1, Data + 0x100, 8, DescWrite);
        _d.MakeAvailable(0);
        _d.MakeAvailable(1);
        var q = Enable();
        Assert.True(q.TryPop(out var first));
        Assert.True(q.Push(first.Head, 8));
        Assert.True(q.TryPop(out var second));
        var saved = q.State(); // the device dies here, before pushing the second chain

        var restored = SplitVirtqueue.FromState(new GuestRam(_m), saved, VirtioFeatures.IndirectDesc);

        Assert.True(restored.TryPop(out var again));
        Assert.Equal(second.Head, again.Head);
        Assert.True(restored.Push(again.Head, 8));
        Assert.False(restored.TryPop(out _));
        Assert.Equal(2, _d.UsedIdx);
        Assert.Equal([(0u, 8u), (1u, 8u)], [_d.UsedElem(0), _d.UsedElem(1)]);
    }

    [Fact]
    public void Restart_from_a_record_older_than_the_used_ring_does_not_complete_a_chain_twice()
    {
        _d.SetDesc(0, Data, 8, DescWrite);
        _d.SetDesc(1, Data + 0x100, 8, DescWrite);
        _d.MakeAvailable(0);
        _d.MakeAvailable(1);
        var q = Enable();
        var stale = q.State(); // saved before anything was taken
        Assert.True(q.TryPop(out var first));
        Assert.True(q.Push(first.Head, 8));

        var restored = SplitVirtqueue.FromState(new GuestRam(_m), stale, 0);

        Assert.True(restored.TryPop(out var next));
        Assert.Equal(1, next.Head);
        Assert.True(restored.Push(next.Head, 8));
        Assert.False(restored.TryPop(out _));
        Assert.Equal(2, _d.UsedIdx);
    }

    [Fact]
    public void Restart_interrupts_at_the_next_decision()
    {
        var q = Enable(features: VirtioFeatures.EventIdx);
        PopAndPush(q, 0);
        Assert.True(q.NeedsInterrupt());
        _d.UsedEvent = 100;

        var restored = SplitVirtqueue.FromState(new GuestRam(_m), q.State(), VirtioFeatures.EventIdx);
        PopAndPush(restored, 1);

        // Whether the lost decision was due is unknown: a spurious interrupt is harmless, a lost one is not.
        Assert.True(restored.NeedsInterrupt());
    }

    [Fact]
    public void Restart_onto_a_used_index_the_driver_corrupted_breaks_the_queue()
    {
        var q = Enable();
        _m.SetU16(_d.Used + 2, 1000); // avail.idx 0 is now 64536 entries "behind" used.idx

        var restored = SplitVirtqueue.FromState(new GuestRam(_m), q.State(), 0);

        Assert.Equal(VirtqueueError.AvailIndexJump, restored.Error);
        Assert.False(restored.TryPop(out _));
    }

    [Fact]
    public void State_round_trips()
    {
        var q = Enable();
        PopAndPush(q, 0);
        PopAndPush(q, 1);

        var s = q.State();

        Assert.Equal(new VirtqueueState(Size, true, _d.Desc, _d.Avail, _d.Used, 2, 2, 0), s);
        Assert.Equal(s with { SignalledUsed = null }, SplitVirtqueue.FromState(new GuestRam(_m), s, 0).State());
    }

    [Fact]
    public void Random_rings_never_throw_and_never_touch_memory_outside_ram()
    {
        // A hostile driver: random descriptors, flags, indices; the model must answer with errors only.
        var rng = new Random(19);
        for (var round = 0; round < 300; round++)
        {
            var m = new TestGuestMemory();
            var d = new DriverRing(m, Size);
            for (var i = 0; i < Size; i++)
            {
                var addr = rng.Next(4) switch
                {
                    0 => (ulong)rng.Next(0, (int)TestGuestMemory.RamSize),
                    1 => 0x5_0000UL,
                    2 => TestGuestMemory.RomBase + (ulong)rng.Next(0, 0x2000),
                    _ => (ulong)rng.NextInt64(),
                };
                var len = rng.Next(3) switch { 0 => (uint)rng.Next(0, 64) * 16, 1 => (uint)rng.Next(), _ => (uint)rng.Next(0, 0x1000) };
                d.SetDesc(i, addr, len, (ushort)rng.Next(0, 8), (ushort)rng.Next(0, Size + 2));
                d.SetDescAt(0x5_0000, i, (ulong)rng.Next(0, (int)TestGuestMemory.RamSize), (uint)rng.Next(0, 256),
                    (ushort)rng.Next(0, 8), (ushort)rng.Next(0, Size + 2));
            }
            var made = rng.Next(1, 2 * Size);
            for (var i = 0; i < made; i++) d.MakeAvailable((ushort)rng.Next(0, Size + 1));
            var q = SplitVirtqueue.Enable(new GuestRam(m), Size, new(d.Desc), new(d.Avail), new(d.Used),
                VirtioFeatures.IndirectDesc | (rng.Next(2) == 0 ? VirtioFeatures.EventIdx : 0));

            for (var i = 0; i < 3 * Size && q.TryPop(out var chain); i++)
            {
                foreach (var b in chain.Writable) Assert.True(new GuestRam(m).Contains(b.Address, b.Length, writable: true));
                q.Push(chain.Head, 0);
                q.NeedsInterrupt();
                q.EnableNotifications();
            }

            Assert.Equal(0, m.AccessesOutside);
            Assert.Equal(0, m.RomWrites);
        }
    }

    private void PopAndPush(SplitVirtqueue q, ushort head)
    {
        _d.SetDesc(head % Size, Data, 8, DescWrite);
        _d.MakeAvailable((ushort)(head % Size));
        Assert.True(q.TryPop(out var chain));
        Assert.True(q.Push(chain.Head, 8));
    }
}

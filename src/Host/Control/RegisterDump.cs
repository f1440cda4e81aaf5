using System.Text;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Control;

/// <summary>The `ctl regs` text: general registers, RIP/RFLAGS, segments, control registers,
/// EFER, APIC base, descriptor tables, and the disassembly at RIP.</summary>
public static class RegisterDump
{
    public static string Format(VcpuProtocol.Registers r, byte[] code, ulong linear)
    {
        var g = r.General;
        var s = r.Special;
        var sb = new StringBuilder();
        sb.AppendLine($"vcpu {r.VcpuId} ({r.State})");
        sb.AppendLine($"RAX={g.Rax:X16} RBX={g.Rbx:X16} RCX={g.Rcx:X16} RDX={g.Rdx:X16}");
        sb.AppendLine($"RSI={g.Rsi:X16} RDI={g.Rdi:X16} RSP={g.Rsp:X16} RBP={g.Rbp:X16}");
        sb.AppendLine($"R8 ={g.R8:X16} R9 ={g.R9:X16} R10={g.R10:X16} R11={g.R11:X16}");
        sb.AppendLine($"R12={g.R12:X16} R13={g.R13:X16} R14={g.R14:X16} R15={g.R15:X16}");
        sb.AppendLine($"RIP={g.Rip:X16} RFLAGS={g.Rflags:X8} [{Flags(g.Rflags)}]");
        foreach (var (name, seg) in new[] { ("CS", s.Cs), ("DS", s.Ds), ("ES", s.Es), ("FS", s.Fs), ("GS", s.Gs), ("SS", s.Ss), ("TR", s.Tr), ("LDT", s.Ldt) })
            sb.AppendLine($"{name,-3} sel={seg.Selector:X4} base={seg.Base:X16} limit={seg.Limit:X8} type={seg.Type:X} " +
                          $"p={B(seg.Present)} dpl={seg.Dpl} db={B(seg.DefaultBig)} s={B(seg.System)} l={B(seg.Long)} g={B(seg.Granularity)}");
        sb.AppendLine($"GDT base={s.Gdt.Base:X16} limit={s.Gdt.Limit:X4}   IDT base={s.Idt.Base:X16} limit={s.Idt.Limit:X4}");
        sb.AppendLine($"CR0={s.Cr0:X16} CR2={s.Cr2:X16} CR3={s.Cr3:X16} CR4={s.Cr4:X16} CR8={s.Cr8:X}");
        sb.AppendLine($"EFER={s.Efer:X16} APIC_BASE={s.ApicBase:X16}");
        sb.AppendLine($"code at linear {linear:X16} ({s.CodeBitness}-bit):");
        if (code.Length == 0) sb.AppendLine("  (not mapped or not readable)");
        else
        {
            var offset = 0;
            var ip = g.Rip;
            for (var n = 0; n < 3 && offset < code.Length; n++)
            {
                var rest = code[offset..];
                var decoder = Iced.Intel.Decoder.Create(s.CodeBitness, new Iced.Intel.ByteArrayCodeReader(rest));
                decoder.IP = ip;
                decoder.Decode(out var instruction);
                if (instruction.IsInvalid || instruction.Length > rest.Length) break;
                var text = FailureReport.Disassemble(rest, ip, s.CodeBitness);
                sb.AppendLine($"  {ip:X16}  {Convert.ToHexString(rest, 0, instruction.Length).ToLowerInvariant(),-24} {text}");
                offset += instruction.Length;
                ip += (ulong)instruction.Length;
            }
            if (offset == 0) sb.AppendLine($"  {Convert.ToHexString(code).ToLowerInvariant()} (not a valid instruction)");
        }
        return sb.ToString();
    }

    private static int B(bool v) => v ? 1 : 0;

    private static string Flags(ulong f)
    {
        var names = new (int Bit, string Name)[] { (0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF") };
        return string.Join(' ', names.Where(n => (f & (1UL << n.Bit)) != 0).Select(n => n.Name));
    }
}

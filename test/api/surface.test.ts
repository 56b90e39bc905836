/**
 * The public API as a TypeScript user sees it, read by the TypeScript
 * compiler from src/index.ts: every named type that an exported function
 * takes or returns (however deeply nested: options, callbacks' arguments,
 * results) is itself exported by name, and every field of those types
 * carries a doc comment.
 */
import assert from "node:assert/strict";
import { join, resolve, sep } from "node:path";
import test from "node:test";
import ts from "typescript";

const SRC = resolve("src") + sep;
const ENTRY = join(SRC, "index.ts");

interface Surface {
  exported: Set<string>;
  /** Named types of ours that the API reaches, and where from. */
  reached: Map<string, string>;
  /** Fields of ours without a doc comment, as Type.field. */
  undocumented: Set<string>;
}

function readSurface(): Surface {
  const program = ts.createProgram([ENTRY], {
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    strict: true,
    noEmit: true,
    skipLibCheck: true,
  });
  const checker = program.getTypeChecker();
  const entry = checker.getSymbolAtLocation(program.getSourceFile(ENTRY)!)!;
  const exports = checker.getExportsOfModule(entry);
  const surface: Surface = {
    exported: new Set(exports.map((s) => s.name)),
    reached: new Map(),
    undocumented: new Set(),
  };
  const ours = (symbol: ts.Symbol | undefined) =>
    (symbol?.declarations ?? []).some((d) => d.getSourceFile().fileName.startsWith(SRC));
  const seen = new Set<ts.Type>();

  const visit = (type: ts.Type, from: string): void => {
    if (seen.has(type)) return;
    seen.add(type);
    const named =
      type.aliasSymbol ??
      (type.flags & ts.TypeFlags.Object &&
      (type as ts.ObjectType).objectFlags & (ts.ObjectFlags.Interface | ts.ObjectFlags.Class)
        ? type.symbol
        : undefined);
    if (named && ours(named) && !surface.reached.has(named.name)) surface.reached.set(named.name, from);
    const where = named?.name ?? from;
    for (const argument of type.aliasTypeArguments ?? []) visit(argument, where);
    if (type.isUnionOrIntersection()) for (const part of type.types) visit(part, where);
    if (!(type.flags & ts.TypeFlags.Object)) return;
    if ((type as ts.ObjectType).objectFlags & ts.ObjectFlags.Reference)
      for (const argument of checker.getTypeArguments(type as ts.TypeReference)) visit(argument, where);
    if (!ours(type.symbol) && !ours(type.aliasSymbol) && !(type.symbol?.flags & ts.SymbolFlags.TypeLiteral)) return; // a library type (Promise, AbortSignal, ...): only its type arguments are ours
    for (const signature of [...type.getCallSignatures(), ...type.getConstructSignatures()])
      visitSignature(signature, where);
    for (const property of type.getProperties()) {
      const declaration = property.valueDeclaration ?? property.declarations?.[0];
      if (!declaration?.getSourceFile().fileName.startsWith(SRC)) continue;
      const owner = (declaration.parent as ts.Node & { name?: ts.Identifier }).name?.text ?? where;
      if (ts.isPropertySignature(declaration) || ts.isPropertyDeclaration(declaration)) {
        if (property.getDocumentationComment(checker).length === 0)
          surface.undocumented.add(`${owner}.${property.name}`);
      }
      visit(checker.getTypeOfSymbol(property), `${where}.${property.name}`);
    }
  };
  const visitSignature = (signature: ts.Signature, from: string) => {
    for (const parameter of signature.getParameters())
      visit(checker.getTypeOfSymbol(parameter), `${from}(${parameter.name})`);
    visit(signature.getReturnType(), `${from}()`);
  };
  for (const symbol of exports) {
    const target = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol;
    if (target.flags & ts.SymbolFlags.Type) visit(checker.getDeclaredTypeOfSymbol(target), symbol.name);
    if (target.flags & ts.SymbolFlags.Value) visit(checker.getTypeOfSymbol(target), symbol.name);
  }
  return surface;
}

const surface = readSurface();

test("every type the API takes or returns is exported by name", () => {
  const missing = [...surface.reached]
    .filter(([name]) => !surface.exported.has(name))
    .map(([name, from]) => `${name} (reached from ${from})`);
  assert.deepEqual(missing, []);
  // the walk itself works: it reaches what is nested in options, results and callbacks
  for (const name of [
    "UpcycleOptions",
    "UpcyclePlan",
    "ArchFeatures",
    "EvalOptions",
    "PerplexityReport",
    "GenerationSettings",
    "Inspection",
    "DownloadProgress",
  ])
    assert.ok(surface.reached.has(name), name);
});

test("every field of the API's types has a doc comment", () => {
  assert.ok(surface.reached.size > 20);
  assert.deepEqual([...surface.undocumented].sort(), []);
});

test("no internal loader is exported", () => {
  for (const name of [
    "openModel",
    "openSeed",
    "describeModel",
    "scanModel",
    "loadTokenizer",
    "generateFromExport",
    "OpenedModel",
    "Seed",
  ])
    assert.ok(!surface.exported.has(name), name);
});
